"""A small real torch EE model for tests of the executor and the runtime.

A residual MLP in double precision (so batched and per-sample results agree
exactly) whose later ramps are more confident, as in a trained EE model.
Families with trained weights are tested in tests/models/test_equivalence.py.
"""
import torch

from e3.models.base import EarlyExitModel, InputKind, ModelMeta
from e3.models.state import BatchState, FieldSpec, StateSpec

WIDTH, CLASSES, BLOCKS = 8, 3, 6


class MLPModel(EarlyExitModel):
    """A residual MLP with a ramp after every block but the last (double precision)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.blocks = [torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64) * 0.6
                       for _ in range(BLOCKS)]
        # Later ramps are more confident, as in a trained EE model.
        self.ramps = [torch.randn(WIDTH, CLASSES, generator=g, dtype=torch.float64) * 0.25 * (k + 1)
                      for k in range(BLOCKS)]
        spec = StateSpec((FieldSpec("hidden", (WIDTH,), torch.float64),))
        self.meta = ModelMeta("mlp", "test", BLOCKS, tuple(range(BLOCKS - 1)), CLASSES,
                              ("a", "b", "c"), InputKind.TENSOR, (WIDTH,), spec, (spec,) * BLOCKS,
                              torch.float64)

    def encode(self, inputs):
        return BatchState({"hidden": torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in inputs])})

    def run(self, first, last, state):
        self.meta.check_block_range(first, last)
        h = state["hidden"]
        for w in self.blocks[first:last + 1]:
            h = h + torch.tanh(h @ w)
        return state.replace(hidden=h)

    def ramp(self, k, state):
        self.meta.check_ramp(k)
        return state["hidden"] @ self.ramps[k]

    def head(self, state):
        return state["hidden"] @ self.ramps[-1]

    def to(self, device):
        return self
