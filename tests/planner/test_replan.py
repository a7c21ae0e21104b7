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
    clock.t = 10
    assert p.reason_to_solve([0.6, 0.3]) == "timer"
    p.solved()
    assert p.reason_to_solve([0.6, 0.3]) is None


def test_switch_only_for_a_real_gain():
    p = ReplanPolicy(interval_s=10, min_gain=0.1, clock=Clock())
    assert not p.worth_switching(100.0, 105.0)
    assert p.worth_switching(100.0, 111.0)
    assert p.worth_switching(0.0, 1.0)
