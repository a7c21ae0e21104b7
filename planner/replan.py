"""When to re-solve and when to switch plans: pure logic, the clock injected.

Re-solve on a timer, or as soon as the forecast leaves the band of survival
the current plan was made for. Switch only when the new plan's predicted
goodput beats the current plan's (re-valued under the same forecast) by
`min_gain`, so that noise does not make plans flap.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence


class ReplanPolicy:
    def __init__(self, interval_s: float, min_gain: float, band: float = 0.05,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.min_gain, self.band, self.clock = interval_s, min_gain, band, clock
        self._last_solve = clock()
        self._planned_for: list[float] | None = None

    def planned(self, survival: Sequence[float]) -> None:
        """The survival the running plan was made for."""
        self._planned_for = list(survival)
        self._last_solve = self.clock()

    def reason_to_solve(self, forecast_mean: Sequence[float]) -> str | None:
        if self._planned_for is not None and any(
                abs(a - b) > self.band for a, b in zip(forecast_mean, self._planned_for)):
            return "forecast left the plan's band"
        if self.clock() - self._last_solve >= self.interval_s:
            return "timer"
        return None

    def solved(self) -> None:
        self._last_solve = self.clock()

    def worth_switching(self, current_goodput: float, new_goodput: float) -> bool:
        return new_goodput > current_goodput * (1 + self.min_gain)
