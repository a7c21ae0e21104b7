"""Forecasting survival per ramp from live exit counts.

Each interval the runtime reports, per ramp, the fraction of admitted inputs
that continued past it (all ramps on; see `estimate_survival`). Per ramp, a
sliding window of those fractions feeds an ARIMA model (statsmodels) that
forecasts the next interval with a 95% band; while the history is short, or
when a fit fails, a moving average with a normal band stands in. Forecasts
are clipped to [0, 1] and made non-increasing along the model.
"""
from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Forecast:
    mean: list[float]
    low: list[float]
    high: list[float]
    method: str
    history: int

    def to_json(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "method": self.method, "history": self.history}


def estimate_survival(splits: Sequence[tuple[int, int]], ramp_blocks: Sequence[int], admitted: int,
                      exits: Sequence[int], observed: Sequence[int], observed_entered: Sequence[int]) -> list[float] | None:
    """Survival past every ramp from one interval's counts, or None without traffic.

    Enabled ramps (split ends) are exact: 1 - (inputs that left up to there) /
    admitted. A disabled ramp k inside split i is estimated from the sampled
    batches, where every inner ramp was evaluated in shadow: survival at the
    split's entry times the fraction of sampled rows not yet willing to exit
    by ramp k. Without samples, a disabled ramp inherits the survival at its
    split's entry (no exit assumed: the conservative choice for capacity).
    """
    if admitted <= 0:
        return None
    surv = [1.0] * len(ramp_blocks)
    left = 0
    s_entry = 1.0
    for i, (first, last) in enumerate(splits):
        inner = [k for k, b in enumerate(ramp_blocks) if first <= b < last]
        sampled = observed_entered[i] if i < len(observed_entered) else 0
        gone = 0
        for k in inner:
            gone += observed[k]
            surv[k] = s_entry * (1 - gone / sampled) if sampled else s_entry
        end = ramp_blocks.index(last) if last in ramp_blocks else None
        if end is not None:
            left += exits[end]
            surv[end] = max(0.0, 1 - left / admitted)
            s_entry = surv[end]
    return _monotone(surv)


def _monotone(values: Sequence[float]) -> list[float]:
    out, cur = [], 1.0
    for v in values:
        cur = min(cur, max(0.0, min(1.0, float(v))))
        out.append(cur)
    return out


class Forecaster:
    """Per-ramp survival forecasts from a sliding window of intervals."""

    def __init__(self, num_ramps: int, window: int = 120, min_history: int = 12,
                 order: tuple[int, int, int] = (1, 0, 0), prior: Sequence[float] | None = None):
        self.num_ramps, self.min_history, self.order = num_ramps, min_history, order
        self._series = [collections.deque(maxlen=window) for _ in range(num_ramps)]
        self.prior = list(prior) if prior is not None else [1.0] * num_ramps

    @property
    def history(self) -> int:
        return len(self._series[0]) if self._series else 0

    def observe(self, survival: Sequence[float]) -> None:
        for series, s in zip(self._series, survival):
            series.append(float(s))

    def forecast(self) -> Forecast:
        if self.num_ramps == 0:
            return Forecast([], [], [], "none", 0)
        if self.history == 0:
            return Forecast(list(self.prior), list(self.prior), list(self.prior), "prior", 0)
        results = [self._one(np.asarray(s, dtype=float)) for s in self._series]
        method = "arima" if all(r[3] for r in results) else "moving-average"
        mean = _monotone([r[0] for r in results])
        low = [max(0.0, min(m, r[1])) for m, r in zip(mean, results)]
        high = [min(1.0, max(m, r[2])) for m, r in zip(mean, results)]
        return Forecast(mean, low, high, method, self.history)

    def _one(self, y: np.ndarray) -> tuple[float, float, float, bool]:
        if len(y) >= self.min_history and np.ptp(y) > 1e-9:
            fitted = self._arima(y)
            if fitted is not None:
                return (*fitted, True)
        return (*self._moving_average(y), False)

    def _moving_average(self, y: np.ndarray, last: int = 8) -> tuple[float, float, float]:
        recent = y[-last:]
        mean = float(recent.mean())
        half = 1.96 * float(recent.std(ddof=1)) / math.sqrt(len(recent)) if len(recent) > 1 else 0.0
        return mean, mean - half, mean + half

    def _arima(self, y: np.ndarray) -> tuple[float, float, float] | None:
        from statsmodels.tools.sm_exceptions import ModelWarning
        from statsmodels.tsa.arima.model import ARIMA
        try:
            with warnings.catch_warnings():
                # Short or flat-ish series make statsmodels warn about its
                # starting values; the fit is still usable, and a failed one
                # falls back to the moving average.
                warnings.simplefilter("ignore", ModelWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                res = ARIMA(y, order=self.order).fit()
                fc = res.get_forecast(1)
                mean = float(fc.predicted_mean[0])
                low, high = (float(v) for v in fc.conf_int(alpha=0.05)[0])
        except (ValueError, np.linalg.LinAlgError, IndexError):
            return None
        if not all(math.isfinite(v) for v in (mean, low, high)):
            return None
        return mean, low, high
