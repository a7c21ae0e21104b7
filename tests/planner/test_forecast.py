"""Survival estimation and forecasting."""
import numpy as np
import pytest

from e3.planner.forecast import Forecaster, estimate_survival


def test_enabled_ramps_are_exact_and_sampling_fills_inner_ones():
    # splits 0..1 and 2..4; ramps after blocks 0, 1, 3: ramp 1 ends split 0, ramps 0 and 2 are inside.
    s = estimate_survival([(0, 1), (2, 4)], [0, 1, 3], admitted=100, exits=[0, 40, 0, 60],
                          observed=[6, 0, 10], observed_entered=[20, 30])
    assert s[1] == pytest.approx(0.6)                   # 40 of 100 left at ramp 1
    assert s[0] == pytest.approx(0.7)                   # sampled: 6 of 20 would have left at ramp 0
    assert s[2] == pytest.approx(0.6 * (1 - 10 / 30))   # inside split 1, from its samples


def test_contradictory_samples_are_clipped_to_non_increasing():
    s = estimate_survival([(0, 1), (2, 4)], [0, 1, 3], admitted=100, exits=[0, 40, 0, 60],
                          observed=[10, 0, 0], observed_entered=[20, 0])
    assert s == sorted(s, reverse=True) and s[0] == pytest.approx(0.5)


def test_unsampled_inner_ramps_assume_no_exit():
    s = estimate_survival([(0, 3)], [0, 1, 2], admitted=50, exits=[0, 0, 0, 50],
                          observed=[0, 0, 0], observed_entered=[0])
    assert s == [1.0, 1.0, 1.0]


def test_no_traffic_gives_none():
    assert estimate_survival([(0, 3)], [0], 0, [0, 0], [0], [0]) is None


def test_prior_then_moving_average_while_history_is_short():
    f = Forecaster(2, min_history=12, prior=[0.7, 0.3])
    assert f.forecast().method == "prior" and f.forecast().mean == [0.7, 0.3]
    for v in (0.5, 0.52, 0.48):
        f.observe([v, v / 2])
    fc = f.forecast()
    assert fc.method == "moving-average" and fc.mean[0] == pytest.approx(0.5)
    assert fc.low[0] < 0.5 < fc.high[0]


def test_constant_series_does_not_break_the_fit():
    f = Forecaster(1, min_history=5)
    for _ in range(20):
        f.observe([0.4])
    fc = f.forecast()
    assert fc.mean == [pytest.approx(0.4)] and fc.method == "moving-average"


def test_arima_follows_a_level_shift():
    rng = np.random.default_rng(0)
    f = Forecaster(2, min_history=12)
    for t in range(60):
        level = 0.8 if t < 40 else 0.3          # the traffic turned hard -> easy
        a = float(np.clip(level + rng.normal(0, 0.02), 0, 1))
        f.observe([a, a * 0.5])
    fc = f.forecast()
    assert fc.method == "arima"
    assert abs(fc.mean[0] - 0.3) < 0.1, fc.mean
    assert fc.low[0] <= fc.mean[0] <= fc.high[0]
    assert fc.mean[1] <= fc.mean[0]
