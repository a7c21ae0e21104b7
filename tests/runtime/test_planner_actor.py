"""Live re-planning on the real default model (in-process engine)."""
import asyncio

import pytest

from e3.models.executor import reference_forward
from e3.runtime.config import E3Config
from e3.runtime.examples import load_examples
from e3.runtime.planner_actor import PlannerActor, placement_from_plan
from e3.runtime.runtime import Runtime


def believing_nothing_exits(rt):
    """An actor that starts from the belief that no input exits early."""
    actor = PlannerActor(rt)
    actor.forecaster.prior = [1.0] * rt.meta.num_ramps
    return actor


async def test_the_plan_follows_the_traffic(e3_cache):
    cfg = E3Config()
    cfg.workers.mode, cfg.workers.cpu_workers = "inline", 2
    cfg.replan.interval_s = 3600          # ticks are driven by the test
    cfg.batching.sample_fraction = 0.5
    async with Runtime(cfg, planner_factory=believing_nothing_exits) as rt:
        first = rt.planner.plan
        assert first.enabled_ramps == [], "believing nothing exits, ramps only cost"
        inputs, labels = load_examples(rt.model_dir)
        results = await asyncio.gather(*(rt.infer([x]) for x in inputs))
        applied = await rt.planner.tick()
        assert applied and rt.epoch == 1
        new = rt.planner.plan
        assert new.enabled_ramps, "after real traffic with early exits, the plan enables ramps"
        assert new.goodput > first.goodput
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
