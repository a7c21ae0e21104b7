"""The planner's settings: one dataclass the runtime's root config includes.

Every field is documented where it is declared; `validate()` raises
ConfigError naming the field (as `planner.<field>`) and quoting the bad value.
The factories build the planner's parts from it, so that the runtime does not
repeat the defaults.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import ConfigError


@dataclass
class PlannerConfig:
    # -- what a plan must meet ----------------------------------------------
    slo_ms: float = 100.0
    """Latency target per request (ms): the DP keeps worst-case latency within slo_ms - slack_ms."""
    slack_ms: float = 10.0
    """Latency held back from the DP (ms) for what it does not model: queueing jitter, the event loop, the network."""
    utilisation: float = 0.8
    """Headroom u in (0, 1]: each device is planned to be at most this busy, so queues stay short."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """Batch sizes the planner searches (also the sizes the profiler measures)."""

    # -- ramp sampling --------------------------------------------------------
    sample_fraction: float = 0.05
    """Fraction of batches that evaluate every ramp (disabled ones in shadow) so their exits stay measured;
    the DP charges their extra cost."""

    # -- forecasting ----------------------------------------------------------
    interval_s: float = 2.0
    """Length of one forecasting interval (s): exit counts are summed per interval."""
    window: int = 120
    """Intervals kept per exit point for the forecast (the sliding window)."""
    min_history: int = 12
    """Intervals needed before ARIMA is fitted; a moving average stands in until then."""
    arima_order: tuple[int, int, int] = (1, 0, 0)
    """(p, d, q) of the per-exit-point ARIMA model."""
    confidence: float = 0.95
    """Confidence of the forecast band."""
    min_admitted: int = 8
    """Intervals with fewer admitted requests than this carry too little signal and are skipped."""
    sample_window: int = 30
    """Intervals over which sampled (shadow) exits at disabled ramps are pooled for their estimate."""

    # -- re-planning ----------------------------------------------------------
    replan_interval_s: float = 30.0
    """Re-solve at least this often (s), even if the forecast stays in the plan's band."""
    band: float = 0.05
    """Least half-width of the survival band around the running plan's forecast; leaving it triggers a solve."""
    min_gain: float = 0.10
    """Apply a new plan only if its predicted goodput beats the running plan's (re-valued under the same
    forecast) by this fraction: no flapping on noise."""
    hold_s: float = 0.0
    """Least time (s) between two plan switches."""

    def validate(self) -> "PlannerConfig":
        _num(self, "slo_ms", lambda v: 0 < v <= 600_000, "a number in (0, 600000]")
        _num(self, "slack_ms", lambda v: 0 <= v < self.slo_ms, "a number in [0, slo_ms)")
        _num(self, "utilisation", lambda v: 0 < v <= 1, "a number in (0, 1]")
        _check(isinstance(self.batch_sizes, list) and self.batch_sizes and all(
            _is_int(b) and 1 <= b <= 65536 for b in self.batch_sizes), "batch_sizes", self.batch_sizes,
            "a non-empty list of integers in 1..65536")
        _num(self, "sample_fraction", lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
        _num(self, "interval_s", lambda v: v > 0, "a positive number of seconds")
        _int(self, "window", 2, "an integer >= 2")
        _int(self, "min_history", 2, "an integer >= 2")
        _check(self.min_history <= self.window, "min_history", self.min_history, f"at most window ({self.window})")
        order = self.arima_order
        _check(isinstance(order, (tuple, list)) and len(order) == 3 and all(_is_int(v) and 0 <= v <= 5 for v in order),
               "arima_order", order, "three integers (p, d, q) in 0..5")
        _num(self, "confidence", lambda v: 0 < v < 1, "a number in (0, 1)")
        _int(self, "min_admitted", 0, "an integer >= 0")
        _int(self, "sample_window", 1, "an integer >= 1")
        _num(self, "replan_interval_s", lambda v: v > 0, "a positive number of seconds")
        _num(self, "band", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _num(self, "min_gain", lambda v: v >= 0, "a number >= 0")
        _num(self, "hold_s", lambda v: v >= 0, "a number of seconds >= 0")
        return self

    # -- factories ------------------------------------------------------------

    def forecaster(self, num_ramps: int, prior: Sequence[float] | None = None):
        from .forecast import Forecaster
        return Forecaster(num_ramps, window=self.window, min_history=self.min_history,
                          order=tuple(self.arima_order), prior=prior, confidence=self.confidence,
                          sample_window=self.sample_window, min_admitted=self.min_admitted)

    def problem(self, num_blocks: int, ramp_blocks: Sequence[int], survival: Sequence[float],
                boundary_bytes: Sequence[int], devices: list, objective: str = "goodput",
                rate: float | None = None):
        """A planning problem with this config's SLO, slack, headroom, batch sizes and sampling."""
        from .problem import Problem
        return Problem(num_blocks, list(ramp_blocks), [float(s) for s in survival], list(boundary_bytes), devices,
                       slo_s=self.slo_ms / 1000, slack_s=self.slack_ms / 1000, utilisation=self.utilisation,
                       batch_sizes=list(self.batch_sizes), objective=objective, rate=rate,
                       sample_fraction=self.sample_fraction).validate()

    def replan_policy(self, clock: Callable[[], float] = time.monotonic):
        from .replan import ReplanPolicy
        return ReplanPolicy(self.replan_interval_s, self.min_gain, band=self.band, hold_s=self.hold_s, clock=clock)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise ConfigError(f"planner.{name} must be {what}, got {value!r}")


def _num(cfg, name: str, ok: Callable[[float], bool], what: str) -> None:
    v = getattr(cfg, name)
    good = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)
    _check(good, name, v, what)


def _int(cfg, name: str, least: int, what: str) -> None:
    v = getattr(cfg, name)
    _check(_is_int(v) and v >= least, name, v, what)
