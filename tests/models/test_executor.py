"""SplitExecutor against the per-sample reference, on a small torch EE model.

The families (ResNet, BERT) get the same checks on real weights in
test_equivalence.py; this file pins the executor's own logic.
"""

import pytest
import torch

from e3.models.base import InputKind, ModelMeta
from e3.models.errors import BlockRangeError
from e3.models.executor import (SplitExecutor, Split, init_state, reference_forward,
                                splits_from_cuts, state_spec_entering)
from e3.models.policies import make_policy
from e3.models.state import BatchState

from tests.support.mlp import BLOCKS, CLASSES, WIDTH, MLPModel


@pytest.fixture(scope="module")
def model():
    return MLPModel()


@pytest.fixture(scope="module")
def inputs():
    return list(torch.randn(60, WIDTH, generator=torch.Generator().manual_seed(1), dtype=torch.float64))


POLICIES = [("entropy", 0.35), ("maxprob", 0.8), ("patience", 2)]


def run_pipeline(model, policy, inputs, cuts, batch=7, observe=False):
    """Split by split, dropping exited rows and merging survivors of several batches
    into batches of `batch` rows, as the runtime's rebatchers do."""
    execs = [SplitExecutor(model, policy, s) for s in splits_from_cuts(model.meta, cuts)]
    answers, observed = {}, {}
    ids = list(range(len(inputs)))
    waiting = [(ids[i:i + batch], init_state(model, policy, inputs[i:i + batch]))
               for i in range(0, len(inputs), batch)]
    for ex in execs:
        survivors = []
        for rid, state in waiting:
            out = ex(state, observe_inner=observe)
            for k, n in out.observed.items():
                observed[k] = observed.get(k, 0) + n
            for pos, logits in zip(out.exited.tolist(), out.logits):
                answers[rid[pos]] = (int(logits.argmax()), out.exit_point)
            if out.state.rows:
                survivors.append(([rid[p] for p in out.survivors.tolist()], out.state))
        # Rebatch: merge the survivors of all batches, cut again into full batches.
        if not survivors:
            break
        rid = [r for ids_, _ in survivors for r in ids_]
        merged = BatchState.concat([s for _, s in survivors])
        waiting = [(rid[i:i + batch], merged.select(torch.arange(i, min(i + batch, merged.rows))))
                   for i in range(0, merged.rows, batch)]
    return [answers[i] for i in range(len(inputs))], observed


@pytest.mark.parametrize("name,threshold", POLICIES)
@pytest.mark.parametrize("cuts", [(), (1,), (0, 2, 4), (2, 3), tuple(range(BLOCKS - 1))])
def test_split_pipeline_equals_reference(model, inputs, name, threshold, cuts):
    policy = make_policy(name, threshold)
    enabled = [model.meta.ramp_at(c) for c in cuts]
    ref = [(a.label, a.exit_point) for a in reference_forward(model, policy, inputs, enabled)]
    got, _ = run_pipeline(model, policy, inputs, cuts)
    assert got == ref
    exits = {e for _, e in ref}
    if cuts == tuple(range(BLOCKS - 1)):
        assert len(exits) > 2, "the test model should exit at several points"


def test_patience_counter_survives_split_boundaries(model, inputs):
    """With every ramp its own split, patience must count across boundaries:
    a policy that lost its counter at each boundary would never exit."""
    policy = make_policy("patience", 2)
    got, _ = run_pipeline(model, policy, inputs, tuple(range(BLOCKS - 1)))
    assert any(e < model.meta.head_exit for _, e in got)
    assert all(e >= 2 for _, e in got if e < model.meta.head_exit)


def test_one_split_without_ramps_equals_stock_model(model, inputs):
    policy = make_policy("entropy", 0.5)
    out = SplitExecutor(model, policy, Split(0, BLOCKS - 1))(model.encode(inputs))
    stock = model.head(model.run(0, BLOCKS - 1, model.encode(inputs)))
    assert torch.equal(out.logits, stock)
    assert out.exit_point == model.meta.head_exit and out.state.rows == 0


def test_observing_inner_ramps_does_not_change_decisions(model, inputs):
    for name, threshold in POLICIES:
        policy = make_policy(name, threshold)
        plain, _ = run_pipeline(model, policy, inputs, (2,))
        sampled, observed = run_pipeline(model, policy, inputs, (2,), observe=True)
        assert plain == sampled
        assert set(observed) == {0, 1, 3, 4}


def test_observed_counts_match_all_ramps_enabled(model, inputs):
    """For an independent policy, the first inner ramp that would let a sample
    exit is where the all-ramps reference exits it."""
    policy = make_policy("maxprob", 0.8)
    ref = reference_forward(model, policy, inputs)
    _, observed = run_pipeline(model, policy, inputs, (), observe=True)
    for k in range(model.meta.num_ramps):
        assert observed[k] == sum(a.exit_point == k for a in ref)


def test_split_end_without_ramp_passes_everyone(model, inputs):
    meta = ModelMeta("m", "t", BLOCKS, (1,), CLASSES, ("a", "b", "c"), InputKind.TENSOR, (WIDTH,),
                     model.meta.input_spec, model.meta.boundary_specs, torch.float64)
    assert Split(0, 2).end_exit(meta) is None


def test_bad_ranges_are_named(model):
    policy = make_policy("entropy", 0.1)
    with pytest.raises(BlockRangeError, match=r"block range 3..9 is outside the model's blocks 0..5"):
        SplitExecutor(model, policy, Split(3, 9))
    with pytest.raises(BlockRangeError, match="ramp index 7 is out of range"):
        reference_forward(model, policy, [], [7])
    with pytest.raises(BlockRangeError, match="cut points"):
        splits_from_cuts(model.meta, [11])


def test_state_spec_entering_includes_policy_fields(model):
    spec = state_spec_entering(model.meta, make_policy("patience", 1), 3)
    assert spec.names == ("hidden", "exit.prev", "exit.count")


def test_meta_rejects_bad_ramp_positions(model):
    with pytest.raises(BlockRangeError, match="ramp_blocks must increase"):
        ModelMeta("m", "t", BLOCKS, (2, 1), CLASSES, ("a", "b", "c"), InputKind.TENSOR, (WIDTH,),
                  model.meta.input_spec, model.meta.boundary_specs)
