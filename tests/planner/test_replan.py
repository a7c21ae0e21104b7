"""The re-planning policy, on a fake clock."""
from e3.planner.forecast import Forecast
from e3.planner.replan import ReplanPolicy


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_timer_and_band_trigger_a_solve():
    clock = Clock()
    p = ReplanPolicy(interval_s=10, min_gain=0.1, band=0.05, clock=clock)
    p.planned([0.6, 0.3])
    assert p.reason_to_solve([0.62, 0.31]) is None
    assert p.reason_to_solve([0.5, 0.3]) == "forecast left the plan's band"
    clock.t = 9.9
    assert p.reason_to_solve([0.6, 0.3]) is None
    clock.t = 10
    assert p.reason_to_solve([0.6, 0.3]) == "timer"
    p.solved()
    assert p.reason_to_solve([0.6, 0.3]) is None


def test_the_band_is_the_forecasts_own_when_wider():
    p = ReplanPolicy(interval_s=100, min_gain=0.1, band=0.02, clock=Clock())
    p.planned(Forecast([0.6, 0.3], [0.45, 0.28], [0.7, 0.33], "arima", 30))
    assert p.reason_to_solve(Forecast([0.47, 0.29], [0, 0], [1, 1], "arima", 31)) is None
    assert p.reason_to_solve([0.44, 0.3]) == "forecast left the plan's band"
    assert p.reason_to_solve([0.6, 0.325]) is None          # within the forecast band, beyond +-band
    assert p.reason_to_solve([0.6, 0.36]) is not None


def test_switch_only_for_a_real_gain():
    p = ReplanPolicy(interval_s=10, min_gain=0.1, clock=Clock())
    assert not p.worth_switching(100.0, 105.0)
    assert "gain too small" in p.why_not_switch(100.0, 110.0)
    assert p.worth_switching(100.0, 111.0)
    assert p.worth_switching(0.0, 1.0)


def test_no_flapping_between_two_plans_on_noise():
    """Forecasts alternating around a level: plans of nearly equal goodput never replace each other."""
    clock = Clock()
    p = ReplanPolicy(interval_s=5, min_gain=0.1, clock=clock)
    p.planned([0.5])
    switches = 0
    for step in range(100):
        clock.t += 1
        level = 0.5 + (0.08 if step % 2 else -0.08)
        if p.reason_to_solve([level]):
            p.solved()
            current, new = 1000.0, 1000.0 * (1 + 0.05 * (1 if step % 2 else -1))
            if p.worth_switching(current, new):
                p.planned([level])
                switches += 1
    assert switches == 0


def test_hold_time_between_switches():
    clock = Clock()
    p = ReplanPolicy(interval_s=5, min_gain=0.1, hold_s=60, clock=clock)
    p.planned([0.5])
    clock.t = 30
    assert p.why_not_switch(100, 200).startswith("held")
    clock.t = 61
    assert p.worth_switching(100, 200)
