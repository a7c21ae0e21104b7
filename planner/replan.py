"""When to re-solve and when to switch plans: pure logic, the clock injected.

Re-solve (`reason_to_solve`):
- on a timer, every `interval_s`, so slow drifts and new profiles are caught;
- at once when the forecast mean leaves the band of the running plan: the
  forecast's confidence band when the plan was made, widened to at least
  +-`band` around its mean (a narrow ARIMA band alone would fire on noise).

Switch (`why_not_switch` is None) only when the new plan's predicted goodput beats
the running plan's, re-valued under the SAME forecast and cost model
(cost_model.py), by `min_gain`, and at least `hold_s` after the last switch: a
plan is never replaced by one that is better only within the noise, and never
flaps. Going back to the stock plan takes less (`why_not_fall_back`): splits
stay only while they beat it by `min_gain`, so within the noise the plan that
pays the least per batch wins.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class Band:
    low: list[float]
    high: list[float]

    def contains(self, values: Sequence[float]) -> bool:
        return all(lo - 1e-12 <= v <= hi + 1e-12 for v, lo, hi in zip(values, self.low, self.high))


class ReplanPolicy:
    def __init__(self, interval_s: float, min_gain: float, band: float = 0.05, hold_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.min_gain, self.band, self.hold_s = interval_s, min_gain, band, hold_s
        self.clock = clock
        self._last_solve = clock()
        self._last_switch: float | None = None
        self.planned_band: Band | None = None

    def planned(self, forecast, switched: bool = True) -> None:
        """A plan made for `forecast` now runs (a Forecast with its band, or plain survival means).
        `switched=False` for the first plan, made from a prior: the hold does not delay replacing it."""
        self._set_band(forecast)
        now = self.clock()
        self._last_solve = now
        if switched:
            self._last_switch = now

    def _set_band(self, forecast) -> None:
        mean = list(getattr(forecast, "mean", forecast))
        low = list(getattr(forecast, "low", mean))
        high = list(getattr(forecast, "high", mean))
        self.planned_band = Band([max(0.0, min(lo, m - self.band)) for m, lo in zip(mean, low)],
                                 [min(1.0, max(hi, m + self.band)) for m, hi in zip(mean, high)])

    def reason_to_solve(self, forecast) -> str | None:
        """Why to re-solve now ("forecast left the plan's band", "timer"), or None."""
        mean = list(getattr(forecast, "mean", forecast))
        if self.planned_band is not None and not self.planned_band.contains(mean):
            return "forecast left the plan's band"
        if self.clock() - self._last_solve >= self.interval_s:
            return "timer"
        return None

    def solved(self, forecast=None) -> None:
        """A solve ran: restart the timer. Given the `forecast` it ran under and the running plan
        kept, that plan is now the one planned for it: the band moves there, or every interval
        after a shift would solve again for the same answer (a solve is 0.1-0.6 s of a core)."""
        self._last_solve = self.clock()
        if forecast is not None:
            self._set_band(forecast)

    def why_held(self) -> str | None:
        """Why no plan may replace the running one yet (it has not run its hold), else None."""
        return self._held()

    def why_not_switch(self, current_goodput: float, new_goodput: float) -> str | None:
        """None if the new plan should replace the running one, else the reason it should not."""
        if self._held():
            return self._held()
        if new_goodput <= current_goodput * (1 + self.min_gain):
            return (f"gain too small: {new_goodput:.1f} vs {current_goodput:.1f} req/s "
                    f"(needs > {self.min_gain:.0%})")
        return None

    def why_not_fall_back(self, current_goodput: float, stock_goodput: float) -> str | None:
        """None if the running split plan should give way to the stock plan, else why not.

        Splits stay only while they beat the stock plan by `min_gain`, so a node that started on
        an easy mix falls back when traffic turns hard, as a node started on the hard mix would
        never have split."""
        if self._held():
            return self._held()
        if current_goodput > stock_goodput * (1 + self.min_gain):
            return (f"splits still pay: {current_goodput:.1f} vs stock {stock_goodput:.1f} req/s "
                    f"(> {self.min_gain:.0%} better)")
        return None

    def _held(self) -> str | None:
        if self._last_switch is not None and self.clock() - self._last_switch < self.hold_s:
            return f"held: last switch {self.clock() - self._last_switch:.1f} s ago (hold {self.hold_s:g} s)"
        return None
