"""The early-exit model interface: what the planner and runtime need, and only that.

An early-exit model is a sequence of L blocks. Ramp k (a small classifier)
sits after block `meta.ramp_blocks[k]`; the head sits after the last block.
Exit points are numbered 0..R-1 for the ramps and R for the head, so a
survival curve over exit points has R+1 entries.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import BlockRangeError
from .state import BatchState, StateSpec


class InputKind(str, enum.Enum):
    """What a request carries: a numeric tensor per sample, or a text string."""

    TENSOR = "tensor"
    TEXT = "text"


@dataclass(frozen=True)
class ModelMeta:
    """Static facts about an early-exit model."""

    name: str
    family: str
    num_blocks: int
    ramp_blocks: tuple[int, ...]
    num_classes: int
    labels: tuple[str, ...]
    input_kind: InputKind
    # Per-sample shape of a TENSOR request (e.g. (64,) or (1, 8, 8)); () for TEXT.
    input_shape: tuple[int, ...]
    input_spec: StateSpec                     # the state entering block 0
    boundary_specs: tuple[StateSpec, ...]     # boundary_specs[b]: the state after block b
    dtype: torch.dtype = torch.float32
    # False for a model whose forward cannot be cut at ramps: E3 then serves it
    # as one split and only counts its exits.
    white_box: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.num_blocks < 1:
            raise BlockRangeError(f"a model needs at least one block, got {self.num_blocks}")
        rb = self.ramp_blocks
        if list(rb) != sorted(set(rb)) or (rb and (rb[0] < 0 or rb[-1] >= self.num_blocks - 1)):
            raise BlockRangeError(
                f"ramp_blocks must increase strictly within 0..{self.num_blocks - 2}, got {rb}")
        if len(self.boundary_specs) != self.num_blocks:
            raise BlockRangeError(
                f"need one boundary spec per block ({self.num_blocks}), got {len(self.boundary_specs)}")
        if len(self.labels) != self.num_classes:
            raise BlockRangeError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def num_ramps(self) -> int:
        return len(self.ramp_blocks)

    @property
    def head_exit(self) -> int:
        """The exit-point number of the head (one past the last ramp)."""
        return len(self.ramp_blocks)

    def exit_block(self, exit_point: int) -> int:
        """The block after which exit point `exit_point` sits."""
        self.check_exit_point(exit_point)
        return self.num_blocks - 1 if exit_point == self.head_exit else self.ramp_blocks[exit_point]

    def ramp_at(self, block: int) -> int | None:
        """The ramp index that sits after `block`, if any."""
        try:
            return self.ramp_blocks.index(block)
        except ValueError:
            return None

    def boundary_bytes(self, block: int) -> int:
        """Bytes of one sample's model state after `block` (without policy fields)."""
        self.check_block_range(block, block)
        return self.boundary_specs[block].bytes_per_sample

    def check_block_range(self, first: int, last: int) -> None:
        if not (0 <= first <= last < self.num_blocks):
            raise BlockRangeError(
                f"block range {first}..{last} is outside the model's blocks 0..{self.num_blocks - 1}")

    def check_ramp(self, k: int) -> None:
        if not (0 <= k < self.num_ramps):
            raise BlockRangeError(f"ramp index {k} is out of range: the model has {self.num_ramps} ramps")

    def check_exit_point(self, e: int) -> None:
        if not (0 <= e <= self.head_exit):
            raise BlockRangeError(f"exit point {e} is out of range 0..{self.head_exit}")

    def describe(self) -> dict:
        """A JSON-able summary (for the HTTP model metadata and the CLI)."""
        return {
            "name": self.name, "family": self.family, "blocks": self.num_blocks,
            "ramp_blocks": list(self.ramp_blocks), "classes": self.num_classes,
            "labels": list(self.labels), "input_kind": self.input_kind.value,
            "input_shape": list(self.input_shape), "dtype": str(self.dtype).replace("torch.", ""),
            "white_box": self.white_box,
            "boundary_bytes": [s.bytes_per_sample for s in self.boundary_specs],
        }


class EarlyExitModel(abc.ABC):
    """A model cut into blocks, with ramps the runtime can evaluate between them.

    Implementations hold their weights in torch modules and run under
    `torch.inference_mode()` (the caller's job). All methods are batch-wise:
    every row of a state is an independent sample, so removing rows or merging
    the rows of several batches never changes any row's result.
    """

    meta: ModelMeta

    @abc.abstractmethod
    def encode(self, inputs: Sequence[Any]) -> BatchState:
        """Turn raw request inputs (arrays or strings) into the state entering block 0.

        Raises InvalidInputError naming the first bad input.
        """

    @abc.abstractmethod
    def run(self, first: int, last: int, state: BatchState) -> BatchState:
        """Run blocks first..last (inclusive) on `state`; ramps inside are skipped."""

    @abc.abstractmethod
    def ramp(self, k: int, state: BatchState) -> torch.Tensor:
        """Logits [rows, classes] of ramp k on the state after its block."""

    @abc.abstractmethod
    def head(self, state: BatchState) -> torch.Tensor:
        """Logits [rows, classes] of the final classifier on the state after the last block."""

    @abc.abstractmethod
    def to(self, device: torch.device | str) -> "EarlyExitModel":
        """Move the weights to `device`; returns self."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def exit_logits(self, exit_point: int, state: BatchState) -> torch.Tensor:
        """Logits of exit point `exit_point` (a ramp, or the head)."""
        if exit_point == self.meta.head_exit:
            return self.head(state)
        self.meta.check_ramp(exit_point)
        return self.ramp(exit_point, state)
