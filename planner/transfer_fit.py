"""A link's transfer cost, fitted from measured hops: `fixed + bytes * per_byte`.

The planner prices moving a boundary state with a device profile's
`transfer(bytes)` (profiles.py: `transfer_fixed_s + bytes * transfer_s_per_byte`).
Across hosts those two numbers come from the link's measured hop times at a
few sizes (bench/link_hop.py): `fit_transfer` is the least-squares line
through them in relative terms (each point's error over its own time), so
a 50 KB hop of 0.2 ms counts as much as a 6 MB hop of 10 ms: the planner
prices boundaries at every batch size, and an absolute fit would let the
largest sizes decide the fixed cost alone. Both terms must be non-negative
(a profile refuses anything else), so a negative intercept is refitted as a
line through the origin and a negative slope as a constant: the best fit
within what a profile can hold.
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
    max_relative_error: float      # the largest |measured - fitted| / measured over the points

    def transfer(self, nbytes: int) -> float:
        return self.fixed_s + nbytes * self.s_per_byte

    def to_json(self) -> dict:
        return {"transfer_fixed_s": self.fixed_s, "transfer_s_per_byte": self.s_per_byte,
                "max_relative_error": self.max_relative_error}


def fit_transfer(points: Sequence[tuple[int, float]]) -> TransferFit:
    """The relative least-squares TransferFit of (bytes, seconds) points; ProfileError when they
    cannot make one (fewer than two distinct sizes, a negative byte count, a time not above 0)."""
    x, y = _checked(points)
    w = 1.0 / y                      # each residual over its own time
    fixed, slope = np.linalg.lstsq(np.stack([w, x * w], axis=1), np.ones_like(y), rcond=None)[0]
    if fixed < 0:                    # through the origin: the slope that best fits alone
        fixed, slope = 0.0, float((x * w) @ np.ones_like(y) / ((x * w) @ (x * w)))
    if slope < 0:                    # no per-byte cost shows: the best constant
        fixed, slope = float(w.sum() / (w @ w)), 0.0
    error = float(np.abs((y - (fixed + slope * x)) / y).max())
    return TransferFit(float(fixed), float(slope), error)


def _checked(points) -> tuple[np.ndarray, np.ndarray]:
    pts = list(points)
    for p in pts:
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
                and p[0] >= 0 and p[1] > 0):
            raise ProfileError(f"a transfer point must be (bytes >= 0, seconds > 0), both finite, got {p!r}")
    x = np.array([float(b) for b, _ in pts])
    if len(set(x.tolist())) < 2:
        raise ProfileError(f"fitting a transfer cost needs points at two or more sizes, got {len(set(x.tolist()))}")
    return x, np.array([float(s) for _, s in pts])
