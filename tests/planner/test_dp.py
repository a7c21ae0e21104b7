"""The planner's DP against brute force, and sanity properties."""
import itertools
import math
import random

import pytest

from e3.planner.dp import evaluate, solve
from e3.planner.plan import Group, Plan
from e3.planner.problem import DeviceType, Problem
from e3.planner.profiles import DeviceProfile

BATCHES = [1, 2, 4, 8]


def profile(name, rng, blocks, ramps, speed=1.0):
    """Batch-friendly costs: a fixed part plus a per-sample part, per block."""
    fixed = [rng.uniform(0.5, 2.0) * 1e-3 / speed for _ in range(blocks)]
    per = [rng.uniform(0.05, 0.5) * 1e-3 / speed for _ in range(blocks)]
    cost = lambda f, q: [f + q * b for b in BATCHES]
    return DeviceProfile(name, BATCHES, [cost(f, q) for f, q in zip(fixed, per)],
                         [cost(0.1e-3 / speed, 0.01e-3 / speed) for _ in range(ramps)],
                         cost(0.1e-3 / speed, 0.01e-3 / speed), 0.05e-3, 1e-10)


def random_problem(seed, types=2, max_blocks=6, objective="goodput"):
    rng = random.Random(seed)
    L = rng.randint(2, max_blocks)
    ramps = sorted(rng.sample(range(L - 1), rng.randint(1, min(3, L - 1))))
    surv, s = [], 1.0
    for _ in ramps:
        s *= rng.uniform(0.2, 1.0)
        surv.append(round(s, 4))
    devices = [DeviceType(f"t{c}", rng.randint(1, 3), rng.choice([1.0, 2.0, 3.5]),
                          profile(f"t{c}", rng, L, len(ramps), speed=rng.choice([1.0, 2.0])))
               for c in range(rng.randint(1, types))]
    return Problem(L, ramps, surv, [rng.randint(100, 5000) for _ in range(L)], devices,
                   slo_s=rng.choice([0.03, 0.06, 0.1]), slack_s=0.005, utilisation=0.8, batch_sizes=BATCHES,
                   objective=objective, rate=rng.uniform(50, 3000) if objective == "cost" else None).validate()


def all_plans(p: Problem):
    """Every plan: cuts, grouping of splits, device type and replicas per group, batch size."""
    names = [d.name for d in p.devices]
    counts = {d.name: d.count for d in p.devices}
    for b in p.batch_sizes:
        for r in range(len(p.ramp_blocks) + 1):
            for cuts in itertools.combinations(p.ramp_blocks, r):
                ends = list(cuts) + [p.num_blocks - 1]
                splits = [[0 if i == 0 else ends[i - 1] + 1, e] for i, e in enumerate(ends)]
                n = len(splits)
                for mask in range(2 ** (n - 1)):
                    bounds = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
                    idx = [list(range(bounds[g], bounds[g + 1])) for g in range(len(bounds) - 1)]
                    for types in itertools.product(names, repeat=len(idx)):
                        for reps in itertools.product(*[range(1, counts[t] + 1) for t in types]):
                            used = {t: 0 for t in names}
                            for t, m in zip(types, reps):
                                used[t] += m
                            if any(used[t] > counts[t] for t in names):
                                continue
                            groups = [Group(t, m, g) for t, m, g in zip(types, reps, idx)]
                            yield Plan(b, splits, groups, [p.ramp_blocks.index(c) for c in cuts],
                                       0, 0, 0, [0.0] * n), used


def brute_goodput(p: Problem) -> float:
    best = 0.0
    for plan, _ in all_plans(p):
        lam, latency, _ = evaluate(p, plan)
        if latency <= p.slo_s - p.slack_s + 1e-9:
            best = max(best, lam)
    return best


def brute_cost(p: Problem) -> float | None:
    best = None
    price = {d.name: d.price_per_hour for d in p.devices}
    for plan, used in all_plans(p):
        lam, _, _ = evaluate(p, plan)
        if lam + 1e-9 < p.rate:
            continue
        s_in = [p.survival_before(s[0]) for s in plan.splits]
        _, lat_at_rate = _latency_at(p, plan, p.rate)
        if lat_at_rate <= p.slo_s - p.slack_s + 1e-9:
            cost = sum(price[t] * n for t, n in used.items())
            best = cost if best is None else min(best, cost)
    return best


def _latency_at(p, plan, lam):
    cap, latency_at_cap, _ = evaluate(p, plan)
    # latency = compute + waits * B / lam; recover compute from the value at cap
    s_in = [p.survival_before(s[0]) for s in plan.splits]
    waits = 1 + sum(1 / max(s, 1e-9) for s in s_in[1:])
    compute = latency_at_cap - waits * plan.batch / cap
    return cap, compute + waits * plan.batch / lam


@pytest.mark.parametrize("seed", range(120))
def test_max_goodput_equals_brute_force(seed):
    p = random_problem(seed)
    best = brute_goodput(p)
    result = solve(p)
    if best == 0.0:
        assert not result.feasible
        return
    assert result.feasible, result.binding
    got = result.plan.goodput
    lam, latency, _ = evaluate(p, result.plan)
    assert latency <= p.slo_s - p.slack_s + 1e-9
    assert got <= best * (1 + 1e-6)
    assert got >= best * (1 - 1e-3), (got, best)


@pytest.mark.parametrize("seed", range(100, 180))
def test_min_cost_equals_brute_force(seed):
    p = random_problem(seed, objective="cost")
    best = brute_cost(p)
    result = solve(p)
    if best is None:
        assert not result.feasible
        return
    assert result.feasible, result.binding
    assert result.plan.cost_per_hour == pytest.approx(best)
    assert result.plan.goodput >= p.rate * (1 - 1e-9)


def test_more_devices_never_lower_goodput():
    for seed in range(20):
        p = random_problem(seed)
        before = solve(p)
        for d in p.devices:
            d.count += 1
        after = solve(p)
        assert (after.plan.goodput if after.feasible else 0) >= (before.plan.goodput if before.feasible else 0) * (1 - 1e-3)


def test_looser_slo_never_lowers_goodput():
    for seed in range(20):
        p = random_problem(seed)
        before = solve(p)
        p.slo_s *= 2
        after = solve(p)
        assert (after.plan.goodput if after.feasible else 0) >= (before.plan.goodput if before.feasible else 0) * (1 - 1e-3)


def test_no_exits_gives_the_stock_model_throughput():
    """With survival 1 everywhere, ramps only cost: the best plan enables none
    (or is as fast as the one-split stock model)."""
    rng = random.Random(7)
    prof = profile("cpu", rng, 6, 3)
    p = Problem(6, [1, 3, 4], [1.0, 1.0, 1.0], [1000] * 6, [DeviceType("cpu", 2, 1.0, prof)],
                slo_s=0.2, batch_sizes=BATCHES).validate()
    plan = solve(p).plan
    stock = Plan(plan.batch, [[0, 5]], [Group("cpu", 2, [0])], [], 0, 0, 0, [0.0])
    assert plan.goodput == pytest.approx(evaluate(p, stock)[0], rel=1e-3)
    assert plan.enabled_ramps == []


def test_impossible_slo_names_the_binding_constraint():
    rng = random.Random(3)
    p = Problem(4, [1], [0.5], [100] * 4, [DeviceType("cpu", 1, 1.0, profile("cpu", rng, 4, 1))],
                slo_s=0.001, slack_s=0.0005, batch_sizes=BATCHES).validate()
    result = solve(p)
    assert not result.feasible and result.binding.startswith("slo: the model alone computes")


def test_too_high_a_rate_names_devices():
    rng = random.Random(4)
    p = Problem(4, [1], [0.5], [100] * 4, [DeviceType("cpu", 1, 1.0, profile("cpu", rng, 4, 1))],
                slo_s=0.5, batch_sizes=BATCHES, objective="cost", rate=1e6).validate()
    result = solve(p)
    assert not result.feasible and result.binding.startswith("devices:")
