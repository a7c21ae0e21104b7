"""Whether the running plan delivers what the cost model predicted for it: pure logic.

Each interval the planner actor reports, for the running plan, the capacity
the cost model predicts at the rows its splits actually ran (so light load,
where batches leave partly filled, is compared like with like) and the
capacity measured from the workers' time per request, plus the share of
answers within the SLO while the offered rate stayed more than `margin` under
the predicted goodput. A plan that misses its prediction by more than `margin` for
`intervals` intervals in a row is failing: the actor then falls back to the
better baseline (stock or the EE model as is), and remembers the measured
ratio for that plan for `memory_s`, so the next solve values it by what it did
rather than by what it promised.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Hashable

_SLO_TARGET = 0.99        # the share of answers within the SLO a plan owes (the bench's pass rule too)


@dataclass
class Check:
    """One interval of the running plan."""

    predicted_capacity: float    # the cost model at the measured rows, req/s
    measured_capacity: float     # u * devices / measured device-seconds per request, req/s
    rate: float                  # admitted req/s in the interval
    predicted_goodput: float     # the cost model's goodput for the plan
    within_slo: float | None     # answers within the SLO in the interval (None: too few to tell)

    def shortfall(self, margin: float, slo_target: float) -> str | None:
        """Why this interval misses the prediction, or None."""
        if self.predicted_capacity > 0 and self.measured_capacity < self.predicted_capacity * (1 - margin):
            return (f"measured capacity {self.measured_capacity:.1f} req/s vs {self.predicted_capacity:.1f} "
                    f"predicted at the rows it ran")
        # a latency miss counts only well under the predicted goodput: near it, a plan on a noisy
        # machine misses now and then, and falling back from a plan that missed 98% within the SLO at
        # 90% of its goodput chained into a worse one (MiniLM 2 x 1, 20:80, 2026-12-06)
        if self.within_slo is not None and self.within_slo < slo_target and \
                self.rate < self.predicted_goodput * (1 - margin):
            return (f"{self.within_slo:.1%} within the SLO at {self.rate:.1f} req/s, more than {margin:.0%} "
                    f"under the {self.predicted_goodput:.1f} req/s predicted")
        return None

    def ratio(self, margin: float = 0.0, slo_target: float = _SLO_TARGET) -> float:
        """What the plan delivered over what it promised (<= 1): its measured capacity over the
        predicted one, and, when it missed the SLO at a rate under its predicted goodput, that rate
        less `margin` over the goodput. Its goodput lies below the rate at which it missed, by how
        much one interval cannot say; valued at the rate itself, a split plan that missed at 70 req/s
        beat the stock plan's 56 predicted (and served) and the next solve went straight back to it."""
        r = min(1.0, self.measured_capacity / self.predicted_capacity) if self.predicted_capacity > 0 else 1.0
        if self.within_slo is not None and self.within_slo < slo_target and 0 < self.rate < self.predicted_goodput:
            r = min(r, self.rate * (1 - margin) / self.predicted_goodput)
        return r


class PlanWatch:
    def __init__(self, margin: float = 0.2, intervals: int = 2, memory_s: float = 120.0,
                 slo_target: float = _SLO_TARGET, clock: Callable[[], float] = time.monotonic):
        self.margin, self.intervals, self.memory_s, self.slo_target = margin, intervals, memory_s, slo_target
        self.clock = clock
        self._key: Hashable | None = None
        self._misses: list[str] = []
        self._ratios: dict[Hashable, tuple[float, float]] = {}     # plan key -> (ratio, until)
        self.last: dict = {}

    def running(self, key: Hashable) -> None:
        """A new plan runs: its record starts empty."""
        if key != self._key:
            self._key, self._misses = key, []

    def observe(self, check: Check) -> str | None:
        """The reason the running plan is failing, once it has missed `intervals` intervals in a row."""
        why = check.shortfall(self.margin, self.slo_target)
        self._misses = self._misses + [why] if why else []
        self.last = {"predicted_capacity": round(check.predicted_capacity, 2),
                     "measured_capacity": round(check.measured_capacity, 2), "rate": round(check.rate, 2),
                     "within_slo": check.within_slo, "misses_in_a_row": len(self._misses), "why": why}
        if len(self._misses) < self.intervals:
            return None
        # a plan that fails again while remembered keeps the lowest it delivered: a miss of the SLO
        # bounds its goodput from above, so a later miss at a higher rate says nothing new
        ratio = min(check.ratio(self.margin, self.slo_target), self.ratio(self._key))
        self._ratios[self._key] = (ratio, self.clock() + self.memory_s)
        reason = f"plan missed its prediction {len(self._misses)} intervals in a row: {self._misses[-1]}"
        self._misses = []
        return reason

    def ratio(self, key: Hashable) -> float:
        """What a plan was measured to deliver over its prediction, while remembered (1.0 otherwise)."""
        ratio, until = self._ratios.get(key, (1.0, 0.0))
        if self.clock() >= until:
            self._ratios.pop(key, None)
            return 1.0
        return ratio

    def view(self) -> dict:
        now = self.clock()
        return {"margin": self.margin, "intervals": self.intervals, "last": self.last,
                "remembered": [{"plan": str(k), "ratio": round(r, 3), "for_s": round(u - now, 1)}
                               for k, (r, u) in self._ratios.items() if u > now]}
