"""Plans valued as the runtime dispatches them (planner/dispatch.py), on a hand-computable profile."""
import pytest

from e3.planner.dispatch import (BatchTiming, blend, choose_plan, dispatch_goodput, entry_batches,
                                 per_batch_costs)
from e3.planner.dp import solve
from e3.planner.plan import Group, Plan
from e3.planner.problem import DeviceType, Problem
from e3.planner.profiles import DeviceProfile

MS = 1e-3
BATCHES = [1, 2, 4, 8]


def linear_profile():
    """Every block takes 0.5 ms + 0.25 ms per row; ramps, head and moves are free."""
    block = [(0.5 + 0.25 * b) * MS for b in BATCHES]
    return DeviceProfile("cpu", BATCHES, [block] * 4, [[0.0] * 4] * 3, [0.0] * 4)


def problem(survival, slo_ms=100.0):
    return Problem(4, [0, 1, 2], list(survival), [100] * 4, [DeviceType("cpu", 1, 0.0, linear_profile())],
                   slo_s=slo_ms * MS, slack_s=10 * MS, batch_sizes=BATCHES).validate()


def two_splits(batch=8):
    return Plan(batch, [[0, 0], [1, 3]], [Group("cpu", 1, [0, 1])], [0], 0, 0, 0, [0.0, 0.0])


def stock(batch=8):
    return Plan(batch, [[0, 3]], [Group("cpu", 1, [0])], [], 0, 0, 0, [0.0])


def test_survivors_of_one_batch_make_the_next_batch():
    assert entry_batches(problem([0.25] * 3), two_splits()) == [8.0, 2.0]
    assert entry_batches(problem([0.05] * 3), two_splits()) == [8.0, 1.0], "a batch holds at least one row"
    assert entry_batches(problem([1.0] * 3), two_splits()) == [8.0, 8.0], "and at most B"


def test_goodput_and_latency_by_hand():
    p = problem([0.25] * 3)
    # stock at 8: 4 blocks x 2.5 ms + 1 ms per batch = 11 ms for 8 requests
    goodput, latency = dispatch_goodput(p, stock(), 1 * MS)
    assert goodput == pytest.approx(0.8 * 8 / (11 * MS))
    assert latency == pytest.approx(22 * MS), "each split may queue behind one batch"
    # two splits: 8 rows through block 0 (2.5 + 1 ms), then 2 rows through blocks 1-3 (3 x 1 + 1 ms),
    # entered by a quarter of the requests
    goodput, _ = dispatch_goodput(p, two_splits(), 1 * MS)
    assert goodput == pytest.approx(0.8 / (3.5 * MS / 8 + 0.25 * 4 * MS / 2))


def test_a_plan_over_the_slo_budget_is_worth_nothing():
    assert dispatch_goodput(problem([0.25] * 3, slo_ms=30), stock(), 5 * MS)[0] == 0.0


def test_a_higher_per_batch_cost_never_raises_goodput():
    p = problem([0.5] * 3)
    values = [dispatch_goodput(p, two_splits(), c * MS)[0] for c in (0, 0.5, 1, 2, 4)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]


def test_splits_that_pay_are_kept_and_splits_that_do_not_fall_back_to_stock():
    easy = problem([0.1] * 3)
    kept = choose_plan(easy, solve(easy).plan, 0.0, 0.1)
    assert len(kept.plan.splits) > 1 and kept.reason.startswith("splits pay")
    hard = problem([0.9] * 3)
    dp_plan = solve(hard).plan
    costly = choose_plan(hard, dp_plan, 3 * MS, 0.1)
    assert costly.plan.splits == [[0, 3]] and costly.plan.enabled_ramps == []
    assert costly.goodput == costly.stock_goodput and "not > 10% better" in costly.reason
    assert choose_plan(hard, None, 0.0, 0.1).plan.splits == [[0, 3]], "no DP plan: stock if it fits"


def test_the_tie_margin_goes_to_the_stock_plan():
    p = problem([0.3] * 3)
    plan = two_splits()
    split_g, stock_g = dispatch_goodput(p, plan, 1 * MS)[0], dispatch_goodput(p, stock(), 1 * MS)[0]
    assert split_g > stock_g
    margin = split_g / stock_g - 1
    assert len(choose_plan(p, plan, 1 * MS, margin * 0.9).plan.splits) == 2
    assert len(choose_plan(p, plan, 1 * MS, margin * 1.1).plan.splits) == 1


def test_per_batch_cost_is_what_the_round_trip_adds_to_the_profile():
    p = problem([0.5] * 3)
    timings = [BatchTiming(0, 0, 4, (1.5 + 2.0) * MS), BatchTiming(1, 3, 2, (3 * 1.0 + 2.5) * MS)]
    assert per_batch_costs(p, timings) == pytest.approx([2.0 * MS, 2.5 * MS])


def test_blend_moves_part_way_and_never_below_zero():
    assert blend(1 * MS, [3 * MS, 2 * MS, 9 * MS]) == pytest.approx(0.7 * MS + 0.3 * 3 * MS)
    assert blend(1 * MS, []) == 1 * MS
    assert blend(0.1 * MS, [-5 * MS]) == 0.0
