"""The simulator against the DP's predictions on simple instances (SIMULATION, not measurement)."""
import json
import random

import numpy as np
import pytest

from e3.planner.solve import solve
from e3.planner.errors import SimulationError
from e3.planner.plan import Group, Plan
from e3.planner.problem import DeviceType, Problem
from e3.planner.simulator import (exit_distribution, exit_trace, find_goodput, poisson_arrivals, simulate,
                                  switching_trace, trace_survival)

from .test_dp import BATCHES, profile


def one_stage_problem(survival=(0.5, 0.2), devices=2):
    prof = profile("cpu", random.Random(1), 4, len(survival))
    return Problem(4, [1, 2][:len(survival)], list(survival), [1000] * 4, [DeviceType("cpu", devices, 1.0, prof)],
                   slo_s=0.1, slack_s=0.01, batch_sizes=BATCHES).validate()


def stock_plan(p, batch=8):
    return Plan(batch, [[0, 3]], [Group("cpu", p.devices[0].count, [0])], [], 0, 0, 0, [0.0])


def replay(p, plan, rate, n=3000, seed=0, work_conserving=False):
    """Deadline batching (the DP's model) unless asked otherwise."""
    rng = np.random.default_rng(seed)
    return simulate(p, plan, poisson_arrivals(rate, n, rng), exit_trace(p.survival, n, rng), seed=seed,
                    work_conserving=work_conserving)


def test_a_single_stage_meets_the_slo_well_below_capacity_and_fails_well_above():
    from e3.planner.dp import evaluate
    p = one_stage_problem()
    plan = stock_plan(p)
    goodput, _, _ = evaluate(p, plan)               # u * capacity
    capacity = goodput / p.utilisation
    calm = replay(p, plan, 0.5 * goodput)
    assert calm.within_slo >= 0.99 and calm.label == "SIMULATION"
    busy = replay(p, plan, 2.0 * capacity)
    assert busy.within_slo < 0.5
    assert max(busy.utilisation.values()) > 0.95
    assert all(u < 0.7 for u in calm.utilisation.values())


def test_simulated_goodput_brackets_the_dp_bound():
    """The DP plans at u = 0.8 of capacity: the simulated goodput lies between that and the raw capacity."""
    p = one_stage_problem()
    result = solve(p)
    sim = find_goodput(p, result.plan, duration_s=3.0, steps=10, work_conserving=False)
    capacity = result.plan.goodput / p.utilisation
    assert result.plan.goodput * 0.95 <= sim.goodput <= capacity * 1.05, (sim.goodput, result.plan.goodput)
    assert "SIMULATION" in sim.describe() and json.loads(json.dumps(sim.to_json()))["label"] == "SIMULATION"


def test_a_split_plan_rebatches_survivors_and_exits_early():
    p = one_stage_problem(survival=(0.3, 0.1))
    plan = solve(p).plan
    assert len(plan.splits) > 1
    report = replay(p, plan, plan.goodput * 0.9)
    assert report.within_slo >= 0.99
    # survivors are gathered into (mostly) full batches downstream
    assert report.mean_batch_rows[1] >= 0.8 * plan.batch
    exits_at_ramps = sum(report.exits[:-1])
    assert exits_at_ramps / report.requests == pytest.approx(1 - p.survival_before(plan.splits[1][0]), abs=0.05)


def test_low_traffic_flushes_partial_batches_to_meet_the_slo():
    p = one_stage_problem()
    report = replay(p, stock_plan(p, batch=8), rate=20.0, n=300)
    assert report.partial_batches[0] > 0.9 and report.within_slo >= 0.99


def test_work_conserving_cuts_latency_when_idle_and_still_fills_batches_when_busy():
    """The runtime's default: an idle device takes a partial batch at once."""
    p = one_stage_problem()
    plan = stock_plan(p, batch=8)
    calm_wc, calm_deadline = (replay(p, plan, 20.0, n=300, work_conserving=wc) for wc in (True, False))
    assert calm_wc.latency_ms["p50"] < 0.5 * calm_deadline.latency_ms["p50"]
    from e3.planner.dp import evaluate
    capacity = evaluate(p, plan)[0] / p.utilisation
    busy = replay(p, plan, 0.95 * capacity, work_conserving=True)
    assert busy.mean_batch_rows[0] >= 0.6 * plan.batch, "a busy device leaves time for batches to fill"


def test_traces():
    rng = np.random.default_rng(0)
    assert exit_distribution([0.6, 0.2]) == pytest.approx([0.4, 0.4, 0.2])
    ex = exit_trace([0.6, 0.2], 20000, rng)
    assert trace_survival(ex, 2) == pytest.approx([0.6, 0.2], abs=0.02)
    arrivals = poisson_arrivals(1000.0, 30000, rng)
    assert len(arrivals) / arrivals[-1] == pytest.approx(1000.0, rel=0.03)
    mix = switching_trace(arrivals, easy=[0.1, 0.05], hard=[0.9, 0.8], rng=rng)
    thirds = np.array_split(mix, 3)
    early = [trace_survival(t, 2)[0] for t in thirds]
    # 80:20 -> 50:50 -> 20:80 easy:hard: survival past ramp 0 rises 0.26 -> 0.5 -> 0.74
    assert early == pytest.approx([0.26, 0.5, 0.74], abs=0.03)


def test_bad_inputs_are_refused():
    p = one_stage_problem()
    with pytest.raises(SimulationError, match="exit points must lie in 0..2"):
        simulate(p, stock_plan(p), np.array([0.0, 1.0]), np.array([0, 5]))
    with pytest.raises(SimulationError, match="exit trace has 1 entries for 2 arrivals"):
        simulate(p, stock_plan(p), np.array([0.0, 1.0]), np.array([0]))
