"""The re-planning policy, on a fake clock."""
from e3.planner.forecast import Forecast
from e3.planner.replan import ReplanPolicy
from tests.support.clock import Clock


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
    assert p.why_not_switch(100.0, 105.0) is not None
    assert "gain too small" in p.why_not_switch(100.0, 110.0)
    assert p.why_not_switch(100.0, 111.0) is None
    assert p.why_not_switch(0.0, 1.0) is None


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
            if p.why_not_switch(current, new) is None:
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
    assert p.why_not_switch(100, 200) is None


def test_the_loop_the_runtime_drives_follows_a_shift_in_traffic():
    """Counts -> survival -> forecast -> solve -> re-value the running plan -> switch, on a fake clock."""
    import json
    import random
    from pathlib import Path

    from e3.planner.config import PlannerConfig
    from e3.planner.dp import evaluate
    from e3.planner.solve import solve
    from e3.planner.forecast import IntervalCounts
    from e3.planner.plan import Plan
    from e3.planner.problem import Problem

    base = json.loads((Path(__file__).resolve().parents[2] / "planner/examples/digits-cpu.json").read_text())
    ramps = base["model"]["ramp_blocks"]
    R = len(ramps)
    cfg = PlannerConfig(min_history=40, replan_interval_s=1000, band=0.05)   # moving average: fast
    clock = Clock()
    policy = cfg.replan_policy(clock)
    fc = cfg.forecaster(R, prior=[1.0] * R)           # what the traffic is at first: hard, nothing leaves early
    problem = lambda surv: Problem.from_json({**base, "survival": surv})
    plan = solve(problem(fc.forecast().mean)).plan
    assert plan.enabled_ramps == []                   # the stock model: ramps would only cost
    policy.planned(fc.forecast())
    rng, switched = random.Random(0), []

    def counts(easy: float, n: int = 400) -> IntervalCounts:
        """n requests, each leaving at ramp 0 with probability `easy`, counted as the runtime would:
        at ramp 0 if it ends a split, else from the (here: every) sampled batch."""
        leave = sum(rng.random() < easy for _ in range(n))
        exits, observed = [0] * (R + 1), [0] * R
        splits = [tuple(s) for s in plan.splits]
        if 0 in plan.enabled_ramps:
            exits[0], exits[R] = leave, n - leave
        else:
            exits[R], observed[0] = n, leave
        entered = [n if i == 0 else 0 for i in range(len(splits))]
        return IntervalCounts(ramps, splits, n, exits, observed, entered)

    for t in range(24):
        clock.t += cfg.interval_s
        fc.update(counts(0.0 if t < 10 else 0.7))     # at t = 10 the traffic turns easy
        forecast = fc.forecast()
        if policy.reason_to_solve(forecast):
            policy.solved()
            p = problem(forecast.mean)
            new = solve(p).plan
            if policy.why_not_switch(evaluate(p, plan)[0], new.goodput) is None:
                new.epoch = plan.epoch + 1
                plan = Plan.from_json(json.loads(json.dumps(new.to_json())))
                policy.planned(forecast)
                switched.append(t)
    assert switched and switched[0] >= 10, switched        # nothing to gain while the traffic is steady
    assert len(switched) <= 2, switched                   # and no flapping after the shift
    assert 0 in plan.enabled_ramps and plan.epoch == len(switched)


def test_splits_fall_back_to_stock_once_they_no_longer_beat_it_by_min_gain():
    clock = Clock()
    p = ReplanPolicy(interval_s=5, min_gain=0.1, hold_s=10, clock=clock)
    p.planned([0.5], switched=False)
    assert p.why_not_fall_back(100.0, 95.0) is None, "the first plan (from a prior) is not held"
    p.planned([0.5])
    clock.t = 5.0
    assert p.why_not_fall_back(100.0, 95.0).startswith("held")
    clock.t = 11.0
    assert "splits still pay" in p.why_not_fall_back(120.0, 100.0)
    assert p.why_not_fall_back(110.0, 100.0) is None


def test_a_solve_that_keeps_the_plan_moves_the_band_to_its_forecast():
    """After the mix shifts, one solve answers "keep the running plan"; the next intervals under the
    same forecast must not solve again (each solve is a tenth of a second or more of a core)."""
    clock = Clock()
    p = ReplanPolicy(interval_s=10, min_gain=0.1, band=0.05, clock=clock)
    p.planned([0.8, 0.8])
    shifted = [0.5, 0.5]
    assert p.reason_to_solve(shifted) == "forecast left the plan's band"
    p.solved(shifted)                      # kept the running plan under `shifted`
    clock.t = 2
    assert p.reason_to_solve(shifted) is None
    assert p.reason_to_solve([0.8, 0.8]) == "forecast left the plan's band"
    p.solved()                             # a solve whose plan is applied: planned() sets the band
    assert p.reason_to_solve([0.8, 0.8]) == "forecast left the plan's band"
