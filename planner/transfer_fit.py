"""A link's transfer cost, fitted from measured hops: `fixed + bytes * per_byte`.

The planner prices moving a boundary state with a device profile's
`transfer(bytes)` (profiles.py: `transfer_fixed_s + bytes * transfer_s_per_byte`).
Across hosts those two numbers come from the link's measured hop times at a
few sizes (bench/link_hop.py): `fit_transfer` is the least-squares line
through them. Both terms must be non-negative (a profile refuses anything
else), so a negative intercept is refitted as a line through the origin and a
negative slope as a constant: the best fit within what a profile can hold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import ProfileError


@dataclass(frozen=True)
class TransferFit:
    """Seconds per hop and per byte, and how far the measured points lie from the line."""

    fixed_s: float
    s_per_byte: float
    max_residual_s: float      # the largest |measured - fitted| over the points

    def transfer(self, nbytes: int) -> float:
        return self.fixed_s + nbytes * self.s_per_byte

    def to_json(self) -> dict:
        return {"transfer_fixed_s": self.fixed_s, "transfer_s_per_byte": self.s_per_byte,
                "max_residual_s": self.max_residual_s}


def fit_transfer(points: Sequence[tuple[int, float]]) -> TransferFit:
    """The least-squares TransferFit of (bytes, seconds) points; ProfileError when they cannot
    make one (fewer than two distinct sizes, a negative or non-finite value)."""
    x, y = _checked(points)
    fixed, slope = np.polyfit(x, y, 1)[::-1]
    if fixed < 0:                    # through the origin: the slope that best fits alone
        fixed, slope = 0.0, float(x @ y / (x @ x))
    if slope < 0:                    # no per-byte cost shows: the mean is the best constant
        fixed, slope = float(y.mean()), 0.0
    residual = float(np.abs(y - (fixed + slope * x)).max())
    return TransferFit(float(fixed), float(slope), residual)


def _checked(points) -> tuple[np.ndarray, np.ndarray]:
    pts = list(points)
    for p in pts:
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in p)):
            raise ProfileError(f"a transfer point must be (bytes, seconds), both finite and >= 0, got {p!r}")
    x = np.array([float(b) for b, _ in pts])
    if len(set(x.tolist())) < 2:
        raise ProfileError(f"fitting a transfer cost needs points at two or more sizes, got {len(set(x.tolist()))}")
    return x, np.array([float(s) for _, s in pts])
