"""Survival estimation from exit counts, and forecasting."""
import numpy as np
import pytest

from e3.planner.forecast import Forecaster, IntervalCounts, SurvivalEstimator, estimate_survival

RAMPS = [0, 1, 3]          # ramps after blocks 0, 1, 3 of a 5-block model; the head after block 4


def test_enabled_ramps_are_exact_and_sampling_fills_inner_ones():
    # splits 0..1 and 2..4: ramp 1 ends split 0; ramps 0 and 2 are inside.
    s = estimate_survival([(0, 1), (2, 4)], RAMPS, admitted=100, exits=[0, 40, 0, 60],
                          observed=[6, 0, 10], observed_entered=[20, 30])
    assert s[1] == pytest.approx(0.6)                   # 40 of 100 left at ramp 1
    assert s[0] == pytest.approx(0.7)                   # sampled: 6 of 20 would have left at ramp 0
    assert s[2] == pytest.approx(0.6 * (1 - 10 / 30))   # inside split 1, from its samples


def test_hazards_chain_over_several_inner_ramps():
    # one split over everything: ramps 0, 1, 2 all inside; 40 sampled rows, 10 would leave at 0, 6 at 1
    s = estimate_survival([(0, 4)], RAMPS, admitted=200, exits=[0, 0, 0, 200],
                          observed=[10, 6, 0], observed_entered=[40])
    assert s[0] == pytest.approx(30 / 40)
    assert s[1] == pytest.approx(30 / 40 * (1 - 6 / 30))      # at risk at ramp 1: 30, not 40
    assert s[2] == pytest.approx(s[1])


def test_all_ramps_enabled_is_exact():
    s = estimate_survival([(0, 0), (1, 1), (2, 3), (4, 4)], RAMPS, admitted=50, exits=[10, 5, 20, 15])
    assert s == pytest.approx([0.8, 0.7, 0.3])


def test_samples_pool_across_intervals_and_plan_changes():
    est = SurvivalEstimator(3, sample_window=10)
    # plan A enables ramp 1 only: ramp 0 sampled inside split 0, 3 of 10 would leave
    a = est.estimate(IntervalCounts(RAMPS, [(0, 1), (2, 4)], 100, [0, 50, 0, 50], [3, 0, 0], [10, 5]))
    # plan B enables every ramp but ramp 0 is sampled again inside a one-split plan: 9 of 30
    b = est.estimate(IntervalCounts(RAMPS, [(0, 4)], 100, [0, 0, 0, 100], [9, 0, 0], [30]))
    assert a[0] == pytest.approx(0.7)
    assert est.hazards()[0] == pytest.approx(12 / 40)          # both intervals' samples
    assert b[0] == pytest.approx(1 - 12 / 40)


def test_contradictory_samples_are_clipped_to_non_increasing():
    s = estimate_survival([(0, 1), (2, 4)], RAMPS, admitted=100, exits=[0, 40, 0, 60],
                          observed=[10, 0, 0], observed_entered=[20, 0])
    assert s == sorted(s, reverse=True) and s[0] == pytest.approx(0.5)


def test_unsampled_inner_ramps_assume_no_exit():
    s = estimate_survival([(0, 4)], RAMPS, admitted=50, exits=[0, 0, 0, 50],
                          observed=[0, 0, 0], observed_entered=[0])
    assert s == [1.0, 1.0, 1.0]


def test_no_traffic_gives_none_and_quiet_intervals_are_skipped():
    assert estimate_survival([(0, 4)], [0], 0, [0, 0], [0], [0]) is None
    f = Forecaster(3, min_admitted=8)
    assert f.update(IntervalCounts(RAMPS, [(0, 4)], 5, [0, 0, 0, 5], [0, 0, 0], [0])) is None
    assert f.history == 0
    assert f.update(IntervalCounts(RAMPS, [(0, 0), (1, 1), (2, 3), (4, 4)], 10, [5, 0, 0, 5])) == [0.5] * 3
    assert f.history == 1


def test_prior_then_moving_average_while_history_is_short():
    f = Forecaster(2, min_history=12, prior=[0.7, 0.3])
    assert f.forecast().method == "prior" and f.forecast().mean == [0.7, 0.3]
    f.observe([0.5, 0.25])
    one = f.forecast()
    assert one.method == "moving-average" and one.low[0] <= 0.5 <= one.high[0]
    for v in (0.52, 0.48):
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
    assert fc.low == fc.high == [pytest.approx(0.4)]


def test_arima_follows_a_level_shift():
    """Traffic turns easy at interval 40: the forecast follows, statsmodels' warnings stay inside."""
    rng = np.random.default_rng(0)
    f = Forecaster(2, min_history=12, order=(1, 0, 0))
    for t in range(60):
        level = 0.8 if t < 40 else 0.3
        a = float(np.clip(level + rng.normal(0, 0.02), 0, 1))
        f.observe([a, a * 0.5])
    fc = f.forecast()          # runs under -W error: a leaked ModelWarning would fail the test
    assert fc.method == "arima"
    assert abs(fc.mean[0] - 0.3) < 0.1, fc.mean
    assert fc.low[0] <= fc.mean[0] <= fc.high[0]
    assert fc.mean[1] <= fc.mean[0]


def test_short_noisy_series_with_a_differenced_model_stays_in_range():
    """(2,1,1) on short series is where statsmodels warns most; forecasts stay valid fractions."""
    rng = np.random.default_rng(1)
    f = Forecaster(2, min_history=12, order=(2, 1, 1))
    for _ in range(14):
        f.observe(sorted(rng.uniform(0, 1, 2), reverse=True))
    fc = f.forecast()
    assert all(0 <= lo <= m <= hi <= 1 for lo, m, hi in zip(fc.low, fc.mean, fc.high))
    assert fc.mean == sorted(fc.mean, reverse=True)


def test_fit_state_rebuilds_a_forecaster_with_the_same_forecast():
    """The forecast process gets this JSON each interval; its fit must equal the node's own."""
    import json
    rng = np.random.default_rng(2)
    f = Forecaster(3, window=50, min_history=12, order=(1, 0, 0), prior=[0.9, 0.5, 0.2])
    for t in range(70):                        # more than the window: only the last 50 stay
        a = float(np.clip(0.6 + 0.1 * np.sin(t / 5) + rng.normal(0, 0.02), 0, 1))
        f.observe([a, a * 0.6, a * 0.3])
    again = Forecaster.from_fit_state(json.loads(json.dumps(f.fit_state())))
    assert again.history == f.history == 50
    assert again.forecast() == f.forecast()
    assert Forecaster.from_fit_state(Forecaster(2, prior=[0.7, 0.4]).fit_state()).forecast().mean == [0.7, 0.4]
