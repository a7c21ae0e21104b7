"""Brute-force enumeration of every plan of the planner's model, for checking the DP.

A plan: a batch size, cuts at any subset of the ramps, the splits grouped
into contiguous runs, a distinct device type per run, and any replica count
from 1 to the type's count. Each is valued by `evaluate` (the model's
definition), independently of the DP's fronts, rounds and pruning.
"""
import itertools

from e3.planner.dp import evaluate
from e3.planner.plan import Group, Plan
from e3.planner.problem import Problem

TOL = 1e-9


def _compositions(n: int, parts: int):
    """Ways to cut n ordered items into `parts` non-empty contiguous runs (as run sizes)."""
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0,) + cuts + (n,)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def all_plans(p: Problem):
    types = [d for d in p.devices if d.count > 0]
    for b in p.batch_sizes:
        for r in range(len(p.ramp_blocks) + 1):
            for cuts in itertools.combinations(p.ramp_blocks, r):
                ends = list(cuts) + [p.num_blocks - 1]
                splits = [[0 if i == 0 else ends[i - 1] + 1, e] for i, e in enumerate(ends)]
                n = len(splits)
                for runs in range(1, min(n, len(types)) + 1):
                    for sizes in _compositions(n, runs):
                        idx, at = [], 0
                        for size in sizes:
                            idx.append(list(range(at, at + size)))
                            at += size
                        for chosen in itertools.permutations(types, runs):
                            for reps in itertools.product(*[range(1, d.count + 1) for d in chosen]):
                                groups = [Group(d.name, m, g) for d, m, g in zip(chosen, reps, idx)]
                                yield Plan(b, splits, groups, [p.ramp_blocks.index(c) for c in cuts],
                                           0, 0, 0, [0.0] * n)


def cost(p: Problem, plan: Plan) -> float:
    price = {d.name: d.price_per_hour for d in p.devices}
    return sum(price[g.device] * g.replicas for g in plan.groups)


def best_goodput(p: Problem, queue: bool = False) -> float:
    budget = p.slo_s - p.slack_s
    best = 0.0
    for plan in all_plans(p):
        if p.budget_per_hour is not None and cost(p, plan) > p.budget_per_hour + TOL:
            continue
        lam, latency, _ = evaluate(p, plan, queue=queue)
        if queue or latency <= budget + TOL:
            best = max(best, lam)
    return best


def least_cost(p: Problem) -> float | None:
    budget = p.slo_s - p.slack_s
    best = None
    for plan in all_plans(p):
        lam, latency, _ = evaluate(p, plan, rate=p.rate, queue=False)
        if lam >= p.rate * (1 - TOL) and latency <= budget + TOL:
            c = cost(p, plan)
            best = c if best is None else min(best, c)
    return best
