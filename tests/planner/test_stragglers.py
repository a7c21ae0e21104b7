"""StragglerWatch: slow for several intervals in a row -> excluded; back after probation."""
from e3.planner.stragglers import StragglerWatch
from tests.support.clock import Clock


def test_a_type_slow_for_the_set_intervals_in_a_row_is_excluded_once():
    w = StragglerWatch(factor=3.0, intervals=3, clock=Clock())
    assert [w.observe("m", 4.0) for _ in range(2)] == [False, False]
    assert w.observe("m", 5.0) is True
    assert "5.0x its profile for 3 intervals" in w.excluded["m"]["why"]
    assert w.observe("m", 9.0) is False, "already out"


def test_one_interval_at_speed_starts_the_count_again():
    w = StragglerWatch(factor=3.0, intervals=3, clock=Clock())
    for r in (4.0, 4.0, 1.2, 4.0, 4.0):
        assert w.observe("m", r) is False
    assert w.observe("m", 3.5) is True
    assert w.observe("other", 10.0) is False


def test_an_excluded_type_comes_back_after_its_probation_and_a_lost_one_is_forgotten():
    clock = Clock()
    w = StragglerWatch(factor=2.0, intervals=1, probation_s=60.0, clock=clock)
    assert w.observe("a", 3.0) and w.observe("b", 3.0)
    clock.t = 30.0
    assert w.released() == [] and w.view()["a"]["back_in_s"] == 30.0
    w.forget("b")
    clock.t = 60.0
    assert w.released() == ["a"] and w.excluded == {}
    assert w.observe("a", 1.0) is False
