"""The per-sample state that travels with each request between splits.

A batch state is a small set of named tensors that share a leading row
dimension: the hidden tensor, an attention mask, an exit policy's counters.
Everything the runtime does to a batch (drop exited rows, merge survivors of
several batches, copy into a shared-memory slot) is a row operation on all
fields at once, so a per-sample exit state can never be separated from its
hidden tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .errors import InvalidStateError


@dataclass(frozen=True)
class FieldSpec:
    """One field of a batch state: its per-sample shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def bytes_per_sample(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StateSpec:
    """The fields of a batch state at one point of the model, in order."""

    fields: tuple[FieldSpec, ...]

    @property
    def bytes_per_sample(self) -> int:
        return sum(f.bytes_per_sample for f in self.fields)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def with_fields(self, extra: Iterable[FieldSpec]) -> "StateSpec":
        """This spec plus `extra` (for example an exit policy's counters)."""
        return StateSpec(self.fields + tuple(extra))


class BatchState:
    """Named tensors that share their first (row) dimension."""

    __slots__ = ("_fields", "_rows")

    def __init__(self, fields: Mapping[str, torch.Tensor]):
        if not fields:
            raise InvalidStateError("a batch state needs at least one field")
        rows = {name: t.shape[0] if t.dim() else None for name, t in fields.items()}
        distinct = set(rows.values())
        if len(distinct) != 1 or None in distinct:
            raise InvalidStateError(f"fields disagree on the number of rows: {rows}")
        self._fields = dict(fields)
        self._rows = distinct.pop()

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def device(self) -> torch.device:
        return next(iter(self._fields.values())).device

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fields[name]

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def items(self):
        return self._fields.items()

    def replace(self, **fields: torch.Tensor) -> "BatchState":
        """A new state with some fields replaced or added."""
        return BatchState({**self._fields, **fields})

    def select(self, index: torch.Tensor) -> "BatchState":
        """The rows named by `index` (a bool mask or integer positions)."""
        return BatchState({n: t[index] for n, t in self._fields.items()})

    def to(self, device: torch.device | str) -> "BatchState":
        return BatchState({n: t.to(device) for n, t in self._fields.items()})

    def spec(self) -> StateSpec:
        return StateSpec(tuple(FieldSpec(n, tuple(t.shape[1:]), t.dtype)
                               for n, t in self._fields.items()))

    def check(self, spec: StateSpec, where: str) -> None:
        """Raise InvalidStateError naming the first field that breaks `spec`."""
        for f in spec.fields:
            if f.name not in self._fields:
                raise InvalidStateError(f"{where}: missing field {f.name!r}")
            t = self._fields[f.name]
            if tuple(t.shape[1:]) != f.shape or t.dtype != f.dtype:
                raise InvalidStateError(
                    f"{where}: field {f.name!r} is {tuple(t.shape[1:])} {t.dtype} per sample, "
                    f"expected {f.shape} {f.dtype}")

    @staticmethod
    def concat(states: Sequence["BatchState"]) -> "BatchState":
        """Merge the rows of several states (survivors of several batches)."""
        if not states:
            raise InvalidStateError("cannot concatenate zero batch states")
        names = list(states[0]._fields)
        for s in states[1:]:
            if list(s._fields) != names:
                raise InvalidStateError(
                    f"cannot merge states with fields {names} and {list(s._fields)}")
        return BatchState({n: torch.cat([s._fields[n] for s in states]) for n in names})

    @staticmethod
    def empty(spec: StateSpec, rows: int = 0, device: str | torch.device = "cpu") -> "BatchState":
        return BatchState({f.name: torch.zeros((rows, *f.shape), dtype=f.dtype, device=device)
                           for f in spec.fields})

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={tuple(t.shape)}:{t.dtype}" for n, t in self._fields.items())
        return f"BatchState(rows={self._rows}, {inner})"
