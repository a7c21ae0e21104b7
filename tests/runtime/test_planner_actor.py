"""Live re-planning on the real default model (in-process engine)."""
import asyncio

import pytest

from e3.models.executor import reference_forward
from e3.runtime.config import E3Config
from e3.runtime.examples import load_examples
from e3.runtime.planner_actor import PlannerActor, placement_from_plan, planner_factory
from e3.runtime.runtime import Runtime
from tests.support.clock import Clock


def pure_compute(cfg):
    cfg.replan.dispatch_ms, cfg.replan.measure_dispatch = 0.0, False
    cfg.replan.node_ms_per_request, cfg.replan.measure_node = 0.0, False
    cfg.replan.measure_compute = False


def scripted_config():
    """Digits in the node, re-planned on the test's clock from scripted measurements; a slow, shared
    machine's late answers are bursts, not overload."""
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode = "inline"
    cfg.replan.interval_s, cfg.replan.forecast_process = 1.0, False
    cfg.batching.timeout_ms = 20000.0
    cfg.batching.max_queue_delay_ms = cfg.batching.timeout_ms
    pure_compute(cfg)
    return cfg


def report_slow_workers(pipeline, factor):
    """Scripted measurements: the pipeline's workers report `factor` times the compute they took."""
    real = pipeline.take_stats

    def slow():
        st = real()
        st.busy_s = [b * factor for b in st.busy_s]
        return st
    pipeline.take_stats = slow


def believing_most_exit_early(clock):
    """Actors on `clock` that start from the belief that most inputs leave at the first ramps."""
    def factory(rt):
        actor = PlannerActor(rt, clock=clock)
        actor.forecaster.prior = [0.1 / (k + 1) for k in range(rt.meta.num_ramps)]
        return actor
    return factory


def believing_nothing_exits(rt):
    """An actor that starts from the belief that no input exits early."""
    actor = PlannerActor(rt)
    actor.forecaster.prior = [1.0] * rt.meta.num_ramps
    return actor


async def test_the_plan_follows_the_traffic(e3_cache):
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode, cfg.workers.cpu_workers = "inline", 2
    cfg.replan.interval_s = 3600          # ticks are driven by the test
    cfg.batching.sample_fraction = 0.5
    cfg.batching.max_queue_delay_ms = cfg.batching.timeout_ms   # all inputs at once: a burst, not overload
    # Compute only: no per-batch or node cost, which on this sub-millisecond model make every split a
    # loss (their own test is below).
    pure_compute(cfg)
    async with Runtime(cfg, planner_factory=believing_nothing_exits) as rt:
        first = rt.planner.plan
        assert first.enabled_ramps == [], "believing nothing exits, ramps only cost"
        inputs, labels = load_examples(rt.model_dir)
        results = await asyncio.gather(*(rt.infer([x]) for x in inputs))
        applied = await rt.planner.tick()
        assert applied and rt.epoch == 1, rt.planner.last_solve
        new = rt.planner.plan
        assert new.enabled_ramps, "after real traffic with early exits, the plan enables ramps"
        assert new.goodput > first.goodput
        slots = rt.placement.ring_slots      # sized for the survival the plan was made for
        assert len(slots) == len(new.splits) and slots[0] == cfg.batching.slots_per_ring
        assert all(cfg.batching.slots_per_ring <= n <= 4 * cfg.batching.slots_per_ring for n in slots)
        view = rt.planner.view()
        fc = view["forecast"]
        assert fc["mean"][0] < 0.9
        # The view carries what the last solve saw, so the plan can be replayed in the simulator.
        from e3.planner.dp import evaluate
        from e3.planner.problem import Problem
        seen = Problem.from_json(view["problem"])
        assert evaluate(seen, new)[0] == pytest.approx(new.goodput, rel=1e-6)
        [swap] = view["swaps"]
        assert swap["epoch"] == 1 and swap["swap_s"] > 0
        again = await asyncio.gather(*(rt.infer([x]) for x in inputs[:100]))
        assert all(r[0].epoch == 1 for r in again)
    ref = reference_forward(rt.loaded.model, rt.policy, [__import__("torch").tensor(x) for x in inputs[:100]],
                            new.enabled_ramps)
    agree = sum((r[0].label, r[0].exit_point) == (a.label, a.exit_point) for r, a in zip(again, ref))
    assert agree >= 98
    assert sum(r[0].label == y for r, y in zip(results, labels)) / len(labels) > 0.95


def test_groups_get_their_own_workers():
    from e3.planner.plan import Group, Plan
    plan = Plan(8, [[0, 1], [2, 3], [4, 4]], [Group("cpu", 2, [0]), Group("cpu", 1, [1, 2])], [1, 3], 0, 0, 0,
                [0.1, 0.2, 0.3])
    p = placement_from_plan(plan, [0, 1, 2])
    assert p.workers == ((0, 1), (2,), (2,)) and p.batch == 8


async def test_the_stock_plan_runs_when_splits_do_not_pay_for_their_batches(e3_cache):
    """A 20 ms per-batch cost makes every extra split of the sub-millisecond default model a loss,
    and the one cost model the DP optimises says so itself (no second model to overrule it)."""
    import dataclasses

    from e3.planner.cost_model import Overheads
    from e3.planner.solve import solve
    from e3.planner.problem import Problem
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode, cfg.workers.cpu_workers = "inline", 2
    cfg.replan.interval_s = 3600
    cfg.replan.dispatch_ms, cfg.replan.measure_dispatch = 20.0, False
    async with Runtime(cfg, planner_factory=planner_factory) as rt:
        view = rt.planner.view()
        problem = Problem.from_json(view["problem"])
        assert problem.overheads.per_batch_s == pytest.approx(0.020) and problem.overheads.work_conserving
        assert problem.sample_fraction == cfg.batching.sample_fraction, "the DP prices the ramp sampling"
        compute_only = dataclasses.replace(problem, overheads=Overheads())
        assert len(solve(compute_only).plan.splits) > 1, "compute alone would split"
        assert solve(problem).plan.splits == [[0, rt.meta.num_blocks - 1]]
        plan, choice = rt.planner.plan, view["last_solve"]["choice"]
        assert plan.splits == [[0, rt.meta.num_blocks - 1]] and plan.enabled_ramps == []
        assert rt.placement.splits == ((0, rt.meta.num_blocks - 1),)
        assert choice["values"]["stock"] >= choice["values"]["dp"] and "stock plan" in choice["reason"]
        assert view["last_solve"]["decision"] == "applied"
        assert view["prediction"]["goodput"] == pytest.approx(plan.goodput, rel=1e-3)
        assert view["prediction"]["splits"][0]["per_batch_ms"] == pytest.approx(20.0)


async def test_the_per_batch_cost_is_measured_from_batches_that_found_their_worker_idle(e3_cache):
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode, cfg.workers.cpu_workers = "inline", 1
    cfg.replan.interval_s = 3600
    cfg.replan.dispatch_ms = 500.0          # a prior far from the truth
    async with Runtime(cfg, planner_factory=planner_factory) as rt:
        inputs, _ = load_examples(rt.model_dir)
        for x in inputs[:24]:               # one at a time: each batch finds its worker idle
            await rt.infer([x])
        timings = [t for p in rt.pipelines.values() for t in p.stats.idle_timings]
        assert len(timings) >= 24 and all(rtt > 0 for _, _, rtt in timings), "timed on the fine clock"
        rt.planner._observe()
        # blended 30% of the way from 500 ms toward a real cost of (well) under 50 ms
        assert 0.0 <= rt.planner.meter.dispatch_s < 0.5 * 0.7 + 0.05


async def test_the_compute_scale_follows_the_workers_measured_compute(e3_cache):
    """Workers that report 20 times their compute move the scale 30% of the way there in one interval,
    and the prediction (GET /e3/plan) shows it."""
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode, cfg.workers.cpu_workers = "inline", 1
    cfg.replan.interval_s = 3600
    async with Runtime(cfg, planner_factory=planner_factory) as rt:
        pipeline = rt.pipelines[rt.epoch]
        report_slow_workers(pipeline, 20)
        inputs, _ = load_examples(rt.model_dir)
        for x in inputs[:24]:               # one at a time: a batch each
            await rt.infer([x])
        rt.planner._observe()
        assert rt.planner.meter.compute_scale > 1 + 0.3 * (20 * 0.3 - 1)     # even if the profile overstates 3x
        await rt.planner.refresh_prediction()                          # as each tick ends
        assert rt.planner.view()["prediction"]["overheads"]["compute_scale"] == rt.planner.meter.compute_scale


async def test_running_splits_fall_back_to_stock_when_batches_cost_more(e3_cache):
    """The guard from the other side: a node that split under a cheap per-batch cost goes back to
    the stock plan on its next solve once the cost makes splits a loss (as a fresh node would)."""
    clock = Clock()
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode, cfg.workers.cpu_workers = "inline", 2
    cfg.replan.interval_s = 1.0
    pure_compute(cfg)

    async with Runtime(cfg, planner_factory=believing_most_exit_early(clock)) as rt:
        await rt.planner.stop()                 # ticks are driven by the test, on its clock
        assert len(rt.planner.plan.splits) > 1
        rt.planner.meter.dispatch_s = 0.020
        clock.t += 3600                         # past the re-solve timer and the hold
        assert await rt.planner.tick(), rt.planner.last_solve
        assert rt.planner.plan.splits == [[0, rt.meta.num_blocks - 1]] and rt.epoch == 1
        assert rt.planner.view()["swaps"][0]["reason"] == "timer"


async def test_forecasts_are_fitted_in_their_own_process_and_match_the_in_thread_fit(e3_cache):
    """ARIMA holds the GIL: fitted on a node thread it stalls the event loop, so it runs in a child."""
    import os
    import random
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode, cfg.workers.cpu_workers = "inline", 1
    cfg.replan.interval_s = 3600
    async with Runtime(cfg, planner_factory=planner_factory) as rt:
        actor = rt.planner
        rng = random.Random(0)
        for _ in range(20):                    # enough history for ARIMA, not a moving average
            actor.forecaster.observe(sorted((0.5 + rng.gauss(0, 0.05) for _ in range(rt.meta.num_ramps)),
                                            reverse=True))
        child = await actor._forecast()
        assert child.method == "arima"
        assert child.mean == pytest.approx(actor.forecaster.forecast().mean, abs=1e-9)
        child_proc = actor._fits._proc
        assert child_proc.pid != os.getpid() and child_proc.returncode is None
    assert actor._fits is None and child_proc.returncode is not None, \
        "stopping the actor stops its forecast process"


async def test_a_plan_that_keeps_missing_its_prediction_falls_back_to_a_baseline(e3_cache):
    """Scripted measurements: the workers report 20 times the compute the profile predicts for the
    running split plan; after `fallback_intervals` intervals the actor runs the better baseline and,
    while it remembers, values the failed plan by what it measured, so a re-solve does not go back."""
    clock, cfg = Clock(), scripted_config()
    cfg.replan.fallback_intervals = 2

    # the trained exit rates as the prior: real traffic stays in the plan's band, so no re-solve interferes
    async with Runtime(cfg, planner_factory=lambda rt: PlannerActor(rt, clock=clock)) as rt:
        await rt.planner.stop()                 # ticks are driven by the test, on its clock
        split_plan = rt.planner.plan
        assert len(split_plan.splits) > 1
        pipeline = rt.pipelines[rt.epoch]
        report_slow_workers(pipeline, 20)
        inputs, _ = load_examples(rt.model_dir)
        solve_when = rt.planner.policy.reason_to_solve
        rt.planner.policy.reason_to_solve = lambda forecast: None    # only the watch may act here
        applied = []
        for _ in range(2):
            await asyncio.gather(*(rt.infer([x]) for x in inputs[:120]))
            clock.t += 1.0
            applied.append(await rt.planner.tick())
        assert applied == [False, True], rt.planner.view()["watch"]
        view = rt.planner.view()
        [fallback] = view["fallbacks"]
        assert fallback["to"] in ("stock", "ee-batch") and "missed its prediction" in fallback["why"]
        assert rt.planner.plan.splits != split_plan.splits and rt.epoch == 1
        [remembered] = view["watch"]["remembered"]
        assert remembered["ratio"] < 0.3
        clock.t += 30                                # past the hold: a timer re-solve
        rt.planner.policy.reason_to_solve = solve_when
        await rt.planner.tick()
        assert rt.planner.plan.splits != split_plan.splits, rt.planner.last_solve
        assert rt.planner.last_solve["choice"]["values"]["dp"] is not None


async def test_when_no_plan_meets_the_slo_any_more_the_node_runs_the_fastest_plan(e3_cache):
    """The SLO tightened under a running split plan (as a measured compute scale can do): the next
    re-solve finds nothing within it and moves to the stock model at its quickest batch."""
    clock = Clock()
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode = "inline"
    cfg.replan.forecast_process = False
    pure_compute(cfg)
    async with Runtime(cfg, planner_factory=lambda rt: PlannerActor(rt, clock=clock)) as rt:
        await rt.planner.stop()                 # ticks are driven by the test, on its clock
        assert len(rt.planner.plan.splits) > 1
        rt.config.batching.slo_ms = 0.05
        rt.planner.policy.reason_to_solve = lambda forecast: "timer"
        clock.t += 3600                         # past any hold
        assert await rt.planner.tick()
        plan = rt.planner.plan
        assert len(plan.splits) == 1 and plan.batch == min(cfg.replan.batch_sizes)
        assert "no plan meets the SLO" in rt.planner.last_solve["choice"]["reason"]
        assert not await rt.planner.tick()      # and it stays there


async def test_the_planner_stops_even_when_a_tick_swallows_its_cancel(e3_cache):
    """A callee that drops the cancel (Python 3.11's wait_for did, when a reply came in the same
    turn) must not keep the planner's loop, and so the node's shutdown, going for ever."""
    cfg = E3Config()
    cfg.model.path = "digits"
    cfg.workers.mode = "inline"
    cfg.replan.interval_s, cfg.replan.forecast_process = 0.01, False
    async with Runtime(cfg, planner_factory=planner_factory) as rt:
        ticking, swallowed = asyncio.Event(), []

        async def stubborn_tick():
            ticking.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:       # only the first: the runtime's own close must still end it
                    raise
                swallowed.append(True)
                return False

        rt.planner.tick = stubborn_tick
        await asyncio.wait_for(ticking.wait(), 5)
        await asyncio.wait_for(rt.planner.stop(), 5)


async def test_shadow_mode_serves_the_configured_plan_values_it_and_only_says_what_it_would_run(e3_cache):
    """replan.observe: the configured cuts and batch run however the planner values them; the actor
    measures and values that plan (its prediction and watch) and records the plan it would run, and
    a plan that keeps missing its prediction is reported, never swapped out."""
    clock, cfg = Clock(), scripted_config()
    cfg.workers.cpu_workers, cfg.replan.observe = 2, True
    cfg.batching.batch, cfg.batching.cuts = 4, []                   # the stock model, pinned

    async with Runtime(cfg, planner_factory=believing_most_exit_early(clock)) as rt:
        await rt.planner.stop()                 # ticks are driven by the test, on its clock
        stock = [[0, rt.meta.num_blocks - 1]]
        plan, view = rt.planner.plan, rt.planner.view()
        assert plan.splits == stock and plan.batch == 4 and plan.enabled_ramps == [] and plan.goodput > 0
        assert rt.placement.splits == ((0, rt.meta.num_blocks - 1),) and rt.placement.batch == 4
        assert view["prediction"]["goodput"] == pytest.approx(plan.goodput, rel=1e-3)
        decision = view["last_solve"]["decision"]
        assert decision.startswith("observing: would run splits"), decision     # most exit early: it would split
        report_slow_workers(rt.pipelines[rt.epoch], 20)
        inputs, _ = load_examples(rt.model_dir)
        for _ in range(cfg.replan.fallback_intervals):
            await asyncio.gather(*(rt.infer([x]) for x in inputs[:120]))
            clock.t += 1.0
            assert not await rt.planner.tick()
        view = rt.planner.view()
        assert rt.epoch == 0 and rt.planner.plan.splits == stock and view["swaps"] == [] == view["fallbacks"]
        assert "missed its prediction" in view["last_solve"]["reason"], view["last_solve"]
        assert view["last_solve"]["decision"].startswith("observing: "), view["last_solve"]
        [remembered] = view["watch"]["remembered"]
        assert remembered["ratio"] < 0.3


def test_shadow_mode_needs_the_planner():
    from e3.runtime.errors import ConfigError
    cfg = E3Config()
    cfg.replan.enabled, cfg.replan.observe = False, True
    with pytest.raises(ConfigError, match="replan.observe"):
        cfg.validate()


def test_the_watch_remembers_a_plan_by_its_splits_at_any_batch_size():
    from e3.planner.plan import Group, Plan
    from e3.runtime.plan_choice import plan_key
    at = lambda b, splits: Plan(b, splits, [Group("cpu", 2, list(range(len(splits))))], [0], 0, 0, 0, [0.0] * len(splits))
    assert plan_key(at(8, [[0, 0], [1, 5]])) == plan_key(at(16, [[0, 0], [1, 5]]))
    assert plan_key(at(8, [[0, 0], [1, 5]])) != plan_key(at(8, [[0, 5]]))


async def test_a_failing_plan_that_still_beats_the_baselines_by_what_it_measured_is_kept(e3_cache):
    """The watch fails a split plan whose workers took 1.3x the profile (capacity 23% under its
    prediction); valued at what it measured it is still far above the baselines (its prediction is
    scripted high), so the actor keeps it and says why instead of falling back to a worse plan."""
    clock, cfg = Clock(), scripted_config()
    async with Runtime(cfg, planner_factory=lambda rt: PlannerActor(rt, clock=clock)) as rt:
        await rt.planner.stop()
        split_plan = rt.planner.plan
        assert len(split_plan.splits) > 1
        split_plan.goodput *= 100                    # valued far above any baseline
        report_slow_workers(rt.pipelines[rt.epoch], 1.3)
        rt.planner.policy.reason_to_solve = lambda forecast: None
        inputs, _ = load_examples(rt.model_dir)
        applied = []
        for _ in range(cfg.replan.fallback_intervals):
            await asyncio.gather(*(rt.infer([x]) for x in inputs[:120]))
            clock.t += 1.0
            applied.append(await rt.planner.tick())
        view = rt.planner.view()
        assert applied == [False, False] and rt.epoch == 0 and rt.planner.plan is split_plan, view["watch"]
        [kept] = view["fallbacks"]
        assert kept["to"] is None and kept["values"].startswith("kept: valued at") and "missed" in kept["why"]
        [remembered] = view["watch"]["remembered"]
        assert remembered["ratio"] < 0.8       # 1.3x and whatever a busy machine adds to the profile
