"""Latency profiles: seconds per batch of each block, ramp and head on a device type.

Measured by the profiler at a few batch sizes. Between them latency is
interpolated linearly; beyond the largest it is extrapolated per sample (a
larger batch costs proportionally more); below the smallest the smallest's
time is used (conservative). Moving a boundary state to another device costs
`transfer_fixed_s + bytes * transfer_s_per_byte` (0 and 0 on one device).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import ProfileError


@dataclass
class DeviceProfile:
    device: str                       # device type, e.g. "cpu-1t" or "h100"
    batch_sizes: list[int]
    block_s: list[list[float]]        # [block][batch index] seconds per batch
    ramp_s: list[list[float]]         # [ramp][batch index]
    head_s: list[float]               # [batch index]
    transfer_fixed_s: float = 0.0     # per hop between devices (same host: a message)
    transfer_s_per_byte: float = 0.0  # per byte of boundary state moved
    meta: dict = field(default_factory=dict)   # how and where it was measured

    def __post_init__(self):
        if not isinstance(self.device, str):
            raise ProfileError(f"profile device must be a string, got {self.device!r}")
        bs = self.batch_sizes
        if not (isinstance(bs, list) and bs and all(_is_int(b) for b in bs) and bs == sorted(set(bs)) and bs[0] >= 1):
            raise ProfileError(f"profile {self.device!r}: batch_sizes must be integers increasing strictly "
                               f"from >= 1, got {bs!r}")
        for name, rows in (("block_s", self.block_s), ("ramp_s", self.ramp_s)):
            if not isinstance(rows, list):
                raise ProfileError(f"profile {self.device!r}: {name} must be a list of rows, got {rows!r}")
        for name, rows in (("block_s", self.block_s), ("ramp_s", self.ramp_s), ("head_s", [self.head_s])):
            for i, row in enumerate(rows):
                if not (isinstance(row, list) and len(row) == len(bs) and all(_seconds(v) for v in row)):
                    where = name if name == "head_s" else f"{name}[{i}]"
                    raise ProfileError(f"profile {self.device!r}: {where} must hold {len(bs)} finite "
                                       f"non-negative seconds, got {row!r}")
        for name in ("transfer_fixed_s", "transfer_s_per_byte"):
            if not _seconds(getattr(self, name)):
                raise ProfileError(f"profile {self.device!r}: {name} must be a finite number >= 0, "
                                   f"got {getattr(self, name)!r}")
        if not isinstance(self.meta, dict):
            raise ProfileError(f"profile {self.device!r}: meta must be an object, got {self.meta!r}")

    def _weights(self, b: int) -> tuple[int, int, float, float]:
        """(lower index, upper index, their weights) of batch size b: linear between measured sizes,
        per sample beyond the largest, the smallest's time below it."""
        bs = self.batch_sizes
        if b <= bs[0]:
            return 0, 0, 1.0, 0.0
        if b >= bs[-1]:
            n = len(bs) - 1
            return n, n, b / bs[-1], 0.0
        i = bisect.bisect_left(bs, b)
        if bs[i] == b:
            return i, i, 1.0, 0.0
        f = (b - bs[i - 1]) / (bs[i] - bs[i - 1])
        return i - 1, i, 1.0 - f, f

    def blocks_at(self, b: int):
        """Seconds per batch of every block at batch size b, as a numpy array."""
        import numpy as np
        if not hasattr(self, "_block_arr"):
            self._block_arr = np.asarray(self.block_s, dtype=float).reshape(len(self.block_s), -1)
        lo, hi, wl, wh = self._weights(b)
        return self._block_arr[:, lo] * wl + self._block_arr[:, hi] * wh

    def _at(self, row: list[float], b: int) -> float:
        bs = self.batch_sizes
        if b <= bs[0]:
            return row[0]
        if b >= bs[-1]:
            return row[-1] * b / bs[-1]
        i = bisect.bisect_left(bs, b)
        lo, hi = bs[i - 1], bs[i]
        return row[i - 1] + (row[i] - row[i - 1]) * (b - lo) / (hi - lo)

    def block(self, k: int, b: int) -> float:
        return self._at(self.block_s[k], b)

    def ramp(self, k: int, b: int) -> float:
        return self._at(self.ramp_s[k], b)

    def head(self, b: int) -> float:
        return self._at(self.head_s, b)

    def transfer(self, nbytes: int) -> float:
        return self.transfer_fixed_s + nbytes * self.transfer_s_per_byte

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "DeviceProfile":
        """The profile in `d`; a missing or unknown field is named (every other check is __post_init__'s)."""
        if not isinstance(d, dict):
            raise ProfileError(f"a profile must be an object, got {d!r}")
        known = [f.name for f in fields(DeviceProfile)]
        unknown = sorted(set(d) - set(known) - {"_comment"})
        if unknown:
            raise ProfileError(f"unknown field {unknown[0]!r} (a profile has {', '.join(known)})")
        required = [f.name for f in fields(DeviceProfile) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ProfileError(f"missing field {missing[0]!r} (required: {', '.join(required)})")
        return DeviceProfile(**{k: v for k, v in d.items() if k != "_comment"})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _seconds(v) -> bool:
    """A finite, non-negative number of seconds (a negative or infinite time breaks every prediction)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
