"""Exit policies: decide from a ramp's logits which rows leave the model.

Independent policies (entropy, max-probability) look at one ramp's logits
only. A dependent policy (patience, PABEE) also reads and updates per-sample
counters; those live as fields of the batch state (prefixed "exit.") so they
travel with the sample across split boundaries and shared-memory hops.

Thresholds can be changed at run time with `set_threshold`; a decision reads
the threshold once, so a change applies from the next batch on.
"""
from __future__ import annotations

import abc
import math
from typing import Mapping

import torch

from .errors import PolicyError
from .state import BatchState, FieldSpec


class ExitPolicy(abc.ABC):
    """Decides which rows exit at a ramp."""

    name: str = ""

    def __init__(self, threshold: float):
        self._threshold = 0.0
        self.set_threshold(threshold)

    @property
    def threshold(self) -> float:
        return self._threshold

    def set_threshold(self, value: float) -> None:
        value = float(value)
        lo, hi = self.threshold_range()
        if not (lo <= value <= hi) or math.isnan(value):
            raise PolicyError(f"{self.name} threshold must lie in [{lo}, {hi}], got {value!r}")
        self._threshold = value

    @staticmethod
    def threshold_range() -> tuple[float, float]:
        return (0.0, 1.0)

    def state_fields(self) -> tuple[FieldSpec, ...]:
        """Per-sample fields this policy keeps in the batch state."""
        return ()

    def init_fields(self, rows: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Initial values of `state_fields` for `rows` new samples."""
        return {}

    @abc.abstractmethod
    def decide(self, logits: torch.Tensor, state: BatchState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(bool exit mask [rows], updated policy fields) for one ramp's logits."""

    def describe(self) -> dict:
        return {"policy": self.name, "threshold": self._threshold}


class EntropyPolicy(ExitPolicy):
    """DeeBERT / BranchyNet: exit when the prediction's entropy is low.

    The entropy is divided by log(classes), so the threshold lies in [0, 1]
    whatever the number of classes: 0 never exits, 1 always does.
    """

    name = "entropy"

    def decide(self, logits, state):
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
        return entropy < self._threshold, {}


class MaxProbPolicy(ExitPolicy):
    """Exit when the largest class probability reaches the threshold."""

    name = "maxprob"

    def decide(self, logits, state):
        top = torch.softmax(logits.float(), dim=-1).amax(-1)
        return top >= self._threshold, {}


class PatiencePolicy(ExitPolicy):
    """PABEE: exit when `patience` consecutive evaluated ramps agree with the one before.

    A dependent policy: the previous prediction and the agreement counter of
    each sample are state fields, so they cross split boundaries with it.
    Only evaluated ramps count, so enabling fewer ramps changes the decisions
    (the reference forward with the same enabled ramps gives the same ones).
    """

    name = "patience"
    PREV = "exit.prev"
    COUNT = "exit.count"

    @staticmethod
    def threshold_range():
        return (1.0, 1000.0)

    def set_threshold(self, value):
        if float(value) != int(float(value)):
            raise PolicyError(f"patience must be a whole number of ramps, got {value!r}")
        super().set_threshold(value)

    def state_fields(self):
        return (FieldSpec(self.PREV, (), torch.int64), FieldSpec(self.COUNT, (), torch.int64))

    def init_fields(self, rows, device="cpu"):
        return {self.PREV: torch.full((rows,), -1, dtype=torch.int64, device=device),
                self.COUNT: torch.zeros(rows, dtype=torch.int64, device=device)}

    def decide(self, logits, state):
        pred = logits.argmax(-1)
        count = torch.where(pred == state[self.PREV], state[self.COUNT] + 1,
                            torch.zeros_like(state[self.COUNT]))
        return count >= int(self._threshold), {self.PREV: pred, self.COUNT: count}


POLICIES: Mapping[str, type[ExitPolicy]] = {
    p.name: p for p in (EntropyPolicy, MaxProbPolicy, PatiencePolicy)
}


def make_policy(name: str, threshold: float) -> ExitPolicy:
    """The policy called `name` with `threshold`; PolicyError names a bad one."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise PolicyError(f"unknown exit policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(threshold)
