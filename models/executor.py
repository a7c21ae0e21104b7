"""Running an early-exit model split by split, and the per-sample reference.

A split is a contiguous range of blocks. At its end sits either a ramp (whose
exit policy decides which rows leave), the head (every row leaves), or, for a
split that ends where no ramp is, nothing (every row survives). Ramps strictly
inside a split are skipped: that is what makes a split one fused call.

`SplitExecutor` is what a worker runs per batch. `reference_forward` is the
plain per-sample EE forward with the same enabled ramps, the yardstick every
split/rebatch path is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .base import EarlyExitModel, ModelMeta
from .errors import BlockRangeError
from .policies import ExitPolicy
from .state import BatchState, StateSpec


@dataclass(frozen=True)
class Split:
    """Blocks first..last (inclusive) run as one unit."""

    first: int
    last: int

    def check(self, meta: ModelMeta) -> None:
        meta.check_block_range(self.first, self.last)

    def end_exit(self, meta: ModelMeta) -> int | None:
        """The exit point at this split's end: a ramp index, the head, or None."""
        if self.last == meta.num_blocks - 1:
            return meta.head_exit
        return meta.ramp_at(self.last)


def splits_from_cuts(meta: ModelMeta, cuts: Iterable[int]) -> tuple[Split, ...]:
    """Splits that end after each block in `cuts` and after the last block."""
    ends = sorted(set(cuts) | {meta.num_blocks - 1})
    if ends[0] < 0 or ends[-1] >= meta.num_blocks:
        raise BlockRangeError(f"cut points {sorted(set(cuts))} lie outside blocks 0..{meta.num_blocks - 1}")
    starts = [0] + [e + 1 for e in ends[:-1]]
    return tuple(Split(s, e) for s, e in zip(starts, ends))


def state_spec_entering(meta: ModelMeta, policy: ExitPolicy, block: int) -> StateSpec:
    """The full spec (model fields plus policy fields) of a batch entering `block`."""
    base = meta.input_spec if block == 0 else meta.boundary_specs[block - 1]
    return base.with_fields(policy.state_fields())


@dataclass
class SplitOutput:
    """What one split did to one batch."""

    exit_point: int | None          # the exit point at the split's end, if any
    exited: torch.Tensor            # row positions (in the input batch) that exited
    logits: torch.Tensor            # [len(exited), classes] logits of those rows
    survivors: torch.Tensor         # row positions that go on to the next split
    state: BatchState               # the survivors' state, ready for the next split
    # Ramp sampling: for rows that entered, the first inner ramp at which the
    # policy would have let them exit had that ramp been enabled ({ramp: count}).
    observed: dict[int, int] = field(default_factory=dict)


class SplitExecutor:
    """Runs one split of a model with an exit policy on batch states."""

    def __init__(self, model: EarlyExitModel, policy: ExitPolicy, split: Split):
        split.check(model.meta)
        self.model, self.policy, self.split = model, policy, split
        self.exit_point = split.end_exit(model.meta)
        self.inner_ramps = tuple(k for k, b in enumerate(model.meta.ramp_blocks)
                                 if split.first <= b < split.last)

    def __call__(self, state: BatchState, observe_inner: bool = False) -> SplitOutput:
        with torch.inference_mode():
            if observe_inner and self.inner_ramps:
                state, observed = self._run_observing(state)
            else:
                state, observed = self.model.run(self.split.first, self.split.last, state), {}
            return self._exit(state, observed)

    def _exit(self, state: BatchState, observed: dict[int, int]) -> SplitOutput:
        rows = torch.arange(state.rows, device=state.device)
        meta = self.model.meta
        if self.exit_point is None:
            return SplitOutput(None, rows[:0], torch.empty(0, meta.num_classes), rows, state, observed)
        logits = self.model.exit_logits(self.exit_point, state)
        if self.exit_point == meta.head_exit:
            return SplitOutput(self.exit_point, rows, logits, rows[:0], state.select(rows[:0]), observed)
        mask, updates = self.policy.decide(logits, state)
        state = state.replace(**updates) if updates else state
        keep = ~mask
        return SplitOutput(self.exit_point, rows[mask], logits[mask], rows[keep], state.select(keep), observed)

    def _run_observing(self, state: BatchState) -> tuple[BatchState, dict[int, int]]:
        """Run block by block, evaluating the inner ramps in shadow (no row exits)."""
        meta, first = self.model.meta, self.split.first
        # The shadow copy of the policy's fields sees the inner ramps; the real
        # fields must not, or the sampled batch would decide differently.
        shadow = {f.name: state[f.name] for f in self.policy.state_fields()}
        undecided = torch.ones(state.rows, dtype=torch.bool, device=state.device)
        observed: dict[int, int] = {}
        for k in self.inner_ramps:
            state = self.model.run(first, meta.ramp_blocks[k], state)
            first = meta.ramp_blocks[k] + 1
            mask, updates = self.policy.decide(self.model.ramp(k, state), state.replace(**shadow))
            shadow.update(updates)
            mask = mask & undecided
            observed[k] = int(mask.sum())
            undecided &= ~mask
        state = self.model.run(first, self.split.last, state)
        return state, observed


def init_state(model: EarlyExitModel, policy: ExitPolicy, inputs: Sequence) -> BatchState:
    """Encode raw inputs and attach the policy's fresh per-sample fields."""
    state = model.encode(inputs)
    return state.replace(**policy.init_fields(state.rows)) if policy.state_fields() else state


@dataclass(frozen=True)
class Answer:
    """The result for one sample."""

    logits: torch.Tensor
    exit_point: int

    @property
    def label(self) -> int:
        return int(self.logits.argmax())


def reference_forward(model: EarlyExitModel, policy: ExitPolicy, inputs: Sequence,
                      enabled_ramps: Iterable[int] | None = None) -> list[Answer]:
    """The plain EE forward, one sample at a time, evaluating only `enabled_ramps`.

    `None` enables every ramp. This is the semantics the split runtime must
    reproduce exactly.
    """
    meta = model.meta
    enabled = sorted(range(meta.num_ramps) if enabled_ramps is None else set(enabled_ramps))
    for k in enabled:
        meta.check_ramp(k)
    executors = [SplitExecutor(model, policy, s)
                 for s in splits_from_cuts(meta, [meta.ramp_blocks[k] for k in enabled])]
    answers = []
    for x in inputs:
        state = init_state(model, policy, [x])
        for ex in executors:
            out = ex(state)
            if len(out.exited):
                answers.append(Answer(out.logits[0], out.exit_point))
                break
            state = out.state
    return answers
