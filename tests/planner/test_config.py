"""PlannerConfig: defaults are valid, bad values are named and quoted."""
import pytest

from e3.planner.config import PlannerConfig
from e3.planner.errors import ConfigError
from e3.planner.forecast import Forecaster
from e3.planner.replan import ReplanPolicy


def test_defaults_validate_and_build_the_parts():
    cfg = PlannerConfig().validate()
    assert isinstance(cfg.forecaster(3, prior=[0.9, 0.5, 0.2]), Forecaster)
    assert isinstance(cfg.replan_policy(clock=lambda: 0.0), ReplanPolicy)


@pytest.mark.parametrize("field,value,message", [
    ("slo_ms", 0, "planner.slo_ms must be a number in (0, 600000], got 0"),
    ("slack_ms", 200.0, "planner.slack_ms must be a number in [0, slo_ms), got 200.0"),
    ("utilisation", 1.5, "planner.utilisation must be a number in (0, 1], got 1.5"),
    ("utilisation", "high", "got 'high'"),
    ("batch_sizes", [], "planner.batch_sizes must be a non-empty list"),
    ("batch_sizes", [8, 0], "got [8, 0]"),
    ("sample_fraction", -0.1, "planner.sample_fraction must be a fraction in [0, 1], got -0.1"),
    ("window", 1, "planner.window must be an integer >= 2, got 1"),
    ("min_history", 500, "planner.min_history must be at most window (120), got 500"),
    ("arima_order", (1, 0), "planner.arima_order must be three integers"),
    ("confidence", 1.0, "planner.confidence must be a number in (0, 1), got 1.0"),
    ("replan_interval_s", float("nan"), "planner.replan_interval_s must be a positive number of seconds, got nan"),
    ("min_gain", -1, "planner.min_gain must be a number >= 0, got -1"),
    ("hold_s", True, "planner.hold_s must be a number of seconds >= 0, got True"),
])
def test_bad_values_are_named_and_quoted(field, value, message):
    cfg = PlannerConfig()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert message in str(err.value)


def test_problem_carries_the_config():
    from e3.planner.problem import DeviceType
    from e3.planner.profiles import DeviceProfile
    prof = DeviceProfile("cpu", [1, 8], [[1e-3, 2e-3]] * 3, [[1e-4, 1e-4]] * 2, [1e-4, 1e-4])
    cfg = PlannerConfig(slo_ms=50, slack_ms=5, batch_sizes=[1, 8], sample_fraction=0.1)
    p = cfg.problem(3, [0, 1], [0.5, 0.2], [64] * 3, [DeviceType("cpu", 2, 0.0, prof)])
    assert (p.slo_s, p.slack_s, p.batch_sizes, p.sample_fraction) == (0.05, 0.005, [1, 8], 0.1)
