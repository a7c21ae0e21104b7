"""Forecasting survival per exit point from live exit counts.

Definitions. Exit points 0..R-1 are the ramps, R the head. s_k is the
fraction of admitted requests that continue past exit point k with EVERY
ramp enabled (s_{-1} = 1, s_R = 0); the forecaster forecasts s_0..s_{R-1}.

Observations. Each interval the runtime reports `IntervalCounts` for the plan
then running: admitted requests, exits per exit point (only enabled exits,
the split ends, can have any), and from the sampled fraction of batches that
evaluated every inner ramp in shadow, per disabled ramp the rows that would
have left there first, and per split the rows that entered sampled batches.

The survival estimator (`SurvivalEstimator.estimate`):
- An enabled ramp e is exact for the interval:
  s_e = 1 - (exits at enabled exit points up to e) / admitted.
- A disabled ramp k inside split i: s_k = s_in(i) * prod over the split's
  inner ramps k' <= k of (1 - h_k'), with s_in(i) the exact survival at the
  split's entry and h_k the hazard at k (would-exits at k / rows at risk at k
  in sampled batches; at risk: the rows entering, less earlier would-exits).
  Hazards pool the last `sample_window` intervals: one interval's 5% sample
  is a handful of rows. Pooling across plan changes is sound because the
  hazard of ramp k given that a row reaches it is a property of the traffic,
  not of which ramps are enabled (the shadow evaluation keeps the policy's
  per-row state, e.g. PABEE's counter, as if every ramp were on).
- A disabled ramp never sampled has h = 0 (no exit assumed: the conservative
  choice for capacity).
- Finally values are clipped to [0, 1] and made non-increasing by a running
  minimum: a row that would leave at a disabled ramp is taken to leave at the
  next enabled one (monotone confidence), so where samples and exact counts
  disagree the lower survival stands for the all-ramps curve.

Forecasts. Per exit point a sliding window of the interval estimates feeds an
ARIMA model (statsmodels; imported once, lazily, ~1.2 s) that forecasts the
next interval with a confidence band. While the history is short, the series
is flat, or a fit fails, a moving average stands in with a predictive normal
band. statsmodels' ModelWarning subclasses (start values, convergence, no
frequency) are silenced around the fit only. Forecasts are clipped to [0, 1]
and made non-increasing along the model.
"""
from __future__ import annotations

import collections
import contextlib
import math
import statistics
import threading
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class IntervalCounts:
    """What the runtime counted in one interval under the plan then running."""

    ramp_blocks: Sequence[int]              # the model's ramp positions
    splits: Sequence[Sequence[int]]         # (first, last) blocks of the running plan's splits
    admitted: int                           # requests admitted (entered split 0)
    exits: Sequence[int]                    # per exit point 0..R: rows that left there
    observed: Sequence[int] = ()            # per ramp: sampled rows that would have left there first (disabled ramps)
    observed_entered: Sequence[int] = ()    # per split: rows that entered sampled batches


@dataclass
class Forecast:
    mean: list[float]
    low: list[float]
    high: list[float]
    method: str                             # "arima", "moving-average", "prior" or "none"
    history: int                            # intervals in the window

    def to_json(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "method": self.method, "history": self.history}


# --------------------------------------------------------------------------
# Survival from counts
# --------------------------------------------------------------------------

class SurvivalEstimator:
    """Interval counts -> survival per ramp (all ramps on), pooling sampled hazards over recent intervals."""

    def __init__(self, num_ramps: int, sample_window: int = 30):
        self.num_ramps = num_ramps
        # per interval: per ramp (would-exit rows, rows at risk) in sampled batches
        self._samples: collections.deque = collections.deque(maxlen=sample_window)

    def hazards(self) -> list[float | None]:
        """Pooled hazard per ramp, None where no sampled row reached it."""
        out = []
        for k in range(self.num_ramps):
            gone = sum(s[k][0] for s in self._samples)
            risk = sum(s[k][1] for s in self._samples)
            out.append(gone / risk if risk > 0 else None)
        return out

    def estimate(self, c: IntervalCounts) -> list[float] | None:
        """Survival past every ramp for this interval, or None without traffic."""
        self._record_samples(c)
        if c.admitted <= 0:
            return None
        hz = self.hazards()
        surv = [1.0] * self.num_ramps
        left, s_entry = 0, 1.0
        for first, last in c.splits:
            for k in _inner(c.ramp_blocks, first, last):
                s_entry *= 1.0 - (hz[k] or 0.0)
                surv[k] = s_entry
            end = _ramp_at(c.ramp_blocks, last)
            if end is not None:
                left += c.exits[end]
                surv[end] = s_entry = max(0.0, 1.0 - left / c.admitted)
        return _monotone(surv)

    def _record_samples(self, c: IntervalCounts) -> None:
        per = [(0, 0)] * self.num_ramps
        for i, (first, last) in enumerate(c.splits):
            risk = c.observed_entered[i] if i < len(c.observed_entered) else 0
            for k in _inner(c.ramp_blocks, first, last):
                gone = c.observed[k] if k < len(c.observed) else 0
                per[k] = (gone, risk)
                risk -= gone
        self._samples.append(per)


def estimate_survival(splits: Sequence[Sequence[int]], ramp_blocks: Sequence[int], admitted: int,
                      exits: Sequence[int], observed: Sequence[int] = (), observed_entered: Sequence[int] = ()
                      ) -> list[float] | None:
    """One interval's survival estimate on its own (no pooling of samples across intervals)."""
    est = SurvivalEstimator(len(ramp_blocks), sample_window=1)
    return est.estimate(IntervalCounts(ramp_blocks, splits, admitted, exits, observed, observed_entered))


def _inner(ramp_blocks: Sequence[int], first: int, last: int) -> list[int]:
    return [k for k, b in enumerate(ramp_blocks) if first <= b < last]


def _ramp_at(ramp_blocks: Sequence[int], block: int) -> int | None:
    return list(ramp_blocks).index(block) if block in ramp_blocks else None


def _monotone(values: Sequence[float]) -> list[float]:
    out, cur = [], 1.0
    for v in values:
        cur = min(cur, max(0.0, min(1.0, float(v))))
        out.append(cur)
    return out


# --------------------------------------------------------------------------
# The forecaster
# --------------------------------------------------------------------------

_ARIMA = None
_ARIMA_LOCK = threading.Lock()


def _one_blas_thread():
    """BLAS limited to one thread for the fit: its matrices are tiny, and two OpenBLAS threads on a
    busy 2-core machine wait on each other for whole scheduler slices (a 0.1 s fit took 7 s)."""
    try:
        from threadpoolctl import threadpool_limits   # installed with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _arima_parts():
    """statsmodels' ARIMA class and ModelWarning, imported once (the import takes about a second)."""
    global _ARIMA
    with _ARIMA_LOCK:
        if _ARIMA is None:
            from statsmodels.tools.sm_exceptions import ModelWarning
            from statsmodels.tsa.arima.model import ARIMA
            _ARIMA = (ARIMA, ModelWarning)
    return _ARIMA


class Forecaster:
    """Per-exit-point survival forecasts from a sliding window of intervals."""

    def __init__(self, num_ramps: int, window: int = 120, min_history: int = 12,
                 order: tuple[int, int, int] = (1, 0, 0), prior: Sequence[float] | None = None,
                 confidence: float = 0.95, sample_window: int = 30, min_admitted: int = 1):
        self.num_ramps, self.min_history, self.order = num_ramps, min_history, tuple(order)
        self.confidence, self.min_admitted = confidence, min_admitted
        self._z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
        self._series = [collections.deque(maxlen=window) for _ in range(num_ramps)]
        self.prior = list(prior) if prior is not None else [1.0] * num_ramps
        self.estimator = SurvivalEstimator(num_ramps, sample_window)

    @staticmethod
    def warm() -> None:
        """Import statsmodels now (for example in a thread at start), not on the first forecast."""
        _arima_parts()

    @property
    def history(self) -> int:
        return len(self._series[0]) if self._series else 0

    def update(self, counts: IntervalCounts) -> list[float] | None:
        """Add one interval's counts; returns its survival estimate (None: too little traffic, skipped)."""
        s = self.estimator.estimate(counts)
        if s is None or counts.admitted < self.min_admitted:
            return None
        self.observe(s)
        return s

    def observe(self, survival: Sequence[float]) -> None:
        """Add one interval's survival per ramp directly."""
        for series, s in zip(self._series, survival):
            series.append(float(s))

    def fit_state(self) -> dict:
        """What `forecast` needs, as plain JSON (the forecast process rebuilds it with `from_fit_state`)."""
        return {"num_ramps": self.num_ramps, "window": self._series[0].maxlen if self._series else 0,
                "min_history": self.min_history, "order": list(self.order), "prior": list(self.prior),
                "confidence": self.confidence, "series": [list(s) for s in self._series]}

    @classmethod
    def from_fit_state(cls, state: dict) -> "Forecaster":
        f = cls(state["num_ramps"], window=state["window"] or 1, min_history=state["min_history"],
                order=tuple(state["order"]), prior=state["prior"], confidence=state["confidence"])
        for series, values in zip(f._series, state["series"], strict=True):
            series.extend(float(v) for v in values)
        return f

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
        if len(recent) < 2:
            return mean, mean - 0.5, mean + 0.5         # one interval: no idea of the spread yet
        # a band for the next interval's value: its own spread plus the mean's uncertainty
        half = self._z * float(recent.std(ddof=1)) * math.sqrt(1 + 1 / len(recent))
        return mean, mean - half, mean + half

    def _arima(self, y: np.ndarray) -> tuple[float, float, float] | None:
        ARIMA, ModelWarning = _arima_parts()
        try:
            with warnings.catch_warnings(), _one_blas_thread():
                # Short or flat-ish series make statsmodels warn about start values and
                # convergence; the fit is still usable, and a failed one falls back.
                warnings.simplefilter("ignore", ModelWarning)
                res = ARIMA(y, order=self.order).fit()
                fc = res.get_forecast(1)
                mean = float(fc.predicted_mean[0])
                low, high = (float(v) for v in fc.conf_int(alpha=1 - self.confidence)[0])
        except (ValueError, np.linalg.LinAlgError, IndexError, OverflowError):
            return None
        if not all(math.isfinite(v) for v in (mean, low, high)):
            return None
        return mean, low, high
