"""runtime/plan_choice.py: options valued by the model and by what they measured, and when to switch."""
from e3.planner.options import Options
from e3.planner.plan import Group, Plan
from e3.planner.plan_watch import Check, PlanWatch
from e3.planner.replan import ReplanPolicy
from e3.runtime.plan_choice import PlanChooser, plan_key
from tests.support.clock import Clock


def plan(splits, goodput, batch=8):
    return Plan(batch, splits, [Group("cpu", 2, list(range(len(splits))))], list(range(len(splits) - 1)),
                goodput, 0.05, 0.0, [0.0] * len(splits))


def chooser():
    clock = Clock()
    return PlanChooser(ReplanPolicy(10.0, 0.10, clock=clock), PlanWatch(0.2, 1, memory_s=60, clock=clock))


def test_a_tie_goes_to_the_stock_plan_and_a_failed_plan_is_valued_by_what_it_measured():
    c = chooser()
    split, stock = plan([[0, 0], [1, 5]], 100.0), plan([[0, 5]], 100.0)
    assert c.choose(Options(None, {"dp": split, "stock": stock}, None)).plan is stock
    c.watch.running(plan_key(split))
    c.watch.observe(Check(100.0, 40.0, 50.0, 100.0, None))      # it delivered 40% of its prediction
    assert c.value(plan([[0, 0], [1, 5]], 200.0, batch=16)) == 80.0, "remembered at any batch size"
    split.goodput = 200.0
    choice = c.choose(Options(None, {"dp": split, "stock": stock}, None))
    assert choice.plan is stock and choice.values == {"dp": 80.0, "stock": 100.0}


def test_the_best_baseline_is_never_the_running_plan_and_the_same_plan_is_not_switched_to():
    c = chooser()
    stock, ee = plan([[0, 5]], 100.0), plan([[0, 0], [1, 5]], 90.0)
    opts = Options(None, {"dp": plan([[0, 0], [1, 5]], 150.0), "stock": stock, "ee-batch": ee}, None)
    assert c.best_baseline(opts, running=stock) == ("ee-batch", ee)
    assert c.best_baseline(opts, running=None) == ("stock", stock)
    same = c.choose(Options(None, {"stock": stock}, None))
    assert c.why_not_switch(same, running=plan([[0, 5]], 100.0), current=100.0) == "the running plan is still the best"
