import pytest
import torch

from e3.models.errors import InvalidStateError
from e3.models.state import BatchState, FieldSpec, StateSpec


def _state(rows=4):
    return BatchState({"hidden": torch.arange(rows * 6, dtype=torch.float32).reshape(rows, 2, 3),
                       "mask": torch.ones(rows, 2, dtype=torch.int64)})


def test_rows_must_agree():
    with pytest.raises(InvalidStateError, match="disagree"):
        BatchState({"a": torch.zeros(3, 2), "b": torch.zeros(4)})


def test_select_and_concat_keep_fields_together():
    s = _state()
    picked = s.select(torch.tensor([True, False, True, False]))
    assert picked.rows == 2 and torch.equal(picked["hidden"][1], s["hidden"][2])
    merged = BatchState.concat([picked, s.select(torch.tensor([3]))])
    assert merged.rows == 3 and torch.equal(merged["hidden"][2], s["hidden"][3])


def test_concat_refuses_different_fields():
    with pytest.raises(InvalidStateError, match="cannot merge"):
        BatchState.concat([_state(), BatchState({"hidden": torch.zeros(1, 2, 3)})])


def test_spec_bytes_and_check():
    spec = _state().spec()
    assert spec.bytes_per_sample == 6 * 4 + 2 * 8
    _state(2).check(spec, "here")
    bad = StateSpec((FieldSpec("hidden", (3, 2), torch.float32),))
    with pytest.raises(InvalidStateError, match=r"here: field 'hidden' is \(2, 3\)"):
        _state().check(bad, "here")
    with pytest.raises(InvalidStateError, match="missing field 'x'"):
        _state().check(StateSpec((FieldSpec("x", (), torch.int64),)), "here")


def test_empty_matches_spec():
    spec = _state().spec()
    e = BatchState.empty(spec, 5)
    assert e.rows == 5 and e.spec() == spec
