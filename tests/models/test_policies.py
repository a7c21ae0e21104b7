import math

import pytest
import torch

from e3.models.errors import PolicyError
from e3.models.policies import EntropyPolicy, MaxProbPolicy, PatiencePolicy, make_policy
from e3.models.state import BatchState

CONFIDENT = torch.tensor([[10.0, 0.0, 0.0]])
UNSURE = torch.tensor([[0.0, 0.0, 0.0]])


def _empty(rows=1):
    return BatchState({"hidden": torch.zeros(rows, 1)})


def test_entropy_exits_confident_rows_only():
    p = EntropyPolicy(0.3)
    mask, updates = p.decide(torch.cat([CONFIDENT, UNSURE]), _empty(2))
    assert mask.tolist() == [True, False] and updates == {}


def test_entropy_is_normalised_to_unit_range():
    p = EntropyPolicy(1.0)
    uniform = torch.zeros(1, 7)
    assert not p.decide(uniform, _empty())[0].item()      # entropy exactly 1: not < 1
    p.set_threshold(1.0 - 1e-9)
    assert not p.decide(uniform, _empty())[0].item()
    assert math.isclose(p.threshold, 1.0 - 1e-9)


def test_maxprob_threshold_is_inclusive():
    probs = torch.tensor([[math.log(3.0), 0.0]])          # softmax = [0.75, 0.25]
    assert MaxProbPolicy(0.75).decide(probs, _empty())[0].item()
    assert not MaxProbPolicy(0.76).decide(probs, _empty())[0].item()


def test_patience_counts_consecutive_agreement():
    p = PatiencePolicy(2)
    state = _empty().replace(**p.init_fields(1))
    decisions = []
    for logits in (CONFIDENT, CONFIDENT, torch.tensor([[0.0, 5.0, 0.0]]), CONFIDENT, CONFIDENT, CONFIDENT):
        mask, updates = p.decide(logits, state)
        state = state.replace(**updates)
        decisions.append((bool(mask), int(state[p.COUNT])))
    # agree, agree(1), change(0), change(0), agree(1), agree(2) -> exit
    assert decisions == [(False, 0), (False, 1), (False, 0), (False, 0), (False, 1), (True, 2)]


def test_threshold_change_at_run_time_applies_next_decision():
    p = make_policy("maxprob", 0.99)
    logits = torch.tensor([[2.0, 0.0]])
    assert not p.decide(logits, _empty())[0].item()
    p.set_threshold(0.5)
    assert p.decide(logits, _empty())[0].item()


@pytest.mark.parametrize("name,value,match", [
    ("entropy", 1.5, r"entropy threshold must lie in \[0.0, 1.0\], got 1.5"),
    ("maxprob", float("nan"), "maxprob threshold"),
    ("patience", 0, "patience threshold"),
    ("patience", 2.5, "whole number of ramps, got 2.5"),
    ("shannon", 0.1, "unknown exit policy 'shannon'"),
])
def test_bad_policy_arguments_are_named(name, value, match):
    with pytest.raises(PolicyError, match=match):
        make_policy(name, value)
