"""The running plan against its prediction (planner/plan_watch.py), on an injected clock."""
import pytest

from e3.planner.plan_watch import Check, PlanWatch
from tests.support.clock import Clock


def check(measured, predicted=100.0, rate=50.0, within=None):
    return Check(predicted, measured, rate, predicted, within)


def test_a_plan_fails_only_after_missing_several_intervals_in_a_row():
    w = PlanWatch(margin=0.2, intervals=3, clock=Clock())
    w.running("a")
    assert w.observe(check(70)) is None and w.observe(check(70)) is None
    assert w.observe(check(95)) is None, "an interval within the margin resets the count"
    assert w.observe(check(70)) is None and w.observe(check(70)) is None
    why = w.observe(check(70))
    assert why and "3 intervals in a row" in why and "70.0" in why


def test_within_the_margin_is_not_a_miss():
    w = PlanWatch(margin=0.2, intervals=1, clock=Clock())
    w.running("a")
    assert w.observe(check(81)) is None
    assert w.observe(check(79)) is not None


def test_latency_misses_count_only_below_the_predicted_goodput():
    w = PlanWatch(margin=0.2, intervals=1, clock=Clock())
    w.running("a")
    assert w.observe(check(100, rate=150, within=0.9)) is None, "over its goodput a plan may miss the SLO"
    assert "within the SLO" in w.observe(check(100, rate=50, within=0.9))
    assert w.observe(check(100, rate=90, within=0.9)) is None, "within the margin of its goodput: noise"
    assert w.observe(check(100, rate=50, within=None)) is None, "too few answers to tell"


def test_a_failed_plan_is_valued_by_what_it_measured_for_a_while():
    clock = Clock()
    w = PlanWatch(margin=0.2, intervals=1, memory_s=60, clock=clock)
    w.running("a")
    w.observe(check(40))
    assert w.ratio("a") == 0.4 and w.ratio("b") == 1.0
    assert w.view()["remembered"][0]["ratio"] == 0.4
    clock.t += 61
    assert w.ratio("a") == 1.0, "it may be tried again once forgotten"


def test_a_plan_that_missed_the_slo_is_remembered_below_the_rate_it_missed_at():
    """Its capacity held, its latency did not: the next solve must not value it at its prediction
    again (it would go straight back to the plan it fell back from), nor at the very rate it missed
    at (its goodput lies below it): at that rate less the margin."""
    w = PlanWatch(margin=0.2, intervals=1, clock=Clock())
    w.running("a")
    assert w.observe(check(100, predicted=100, rate=60, within=0.93)) is not None
    assert w.ratio("a") == pytest.approx(0.48)


def test_a_new_plan_starts_a_clean_record():
    w = PlanWatch(margin=0.2, intervals=2, clock=Clock())
    w.running("a")
    w.observe(check(50))
    w.running("b")
    assert w.observe(check(50)) is None


def test_a_plan_failing_again_while_remembered_keeps_the_lowest_it_delivered():
    clock = Clock()
    w = PlanWatch(margin=0.2, intervals=1, memory_s=60, clock=clock)
    w.running("a")
    w.observe(check(100, predicted=100, rate=60, within=0.93))        # missed at 60: remembered at 0.48
    w.observe(check(100, predicted=100, rate=75, within=0.95))        # missed at 75 too: says nothing new
    assert w.ratio("a") == pytest.approx(0.48)
    w.observe(check(30))                                               # then its capacity fell short
    assert w.ratio("a") == pytest.approx(0.3)
    clock.t += 61
    w.observe(check(100, predicted=100, rate=70, within=0.95))        # forgotten: a fresh record
    assert w.ratio("a") == pytest.approx(0.56)
