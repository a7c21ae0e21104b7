"""The baselines every solve is checked against, as plans of the planner's model: the stock model
(one split) and the EE model served as is (a split after every ramp), each on the devices of one
type at its best batch size, and the fastest plan, served when no plan meets the SLO.

Valued like every plan (dp.finish_plan: the cost model, with the queue where asked).
"""
from __future__ import annotations

from .dp import EPS, evaluate, finish_plan
from .plan import Group, Plan
from .problem import Problem


def best_stock_plan(problem: Problem, queue: bool = True) -> Plan | None:
    """The stock model (one split) on all devices of one type, at the best batch size, if any meets the SLO."""
    return _best_fixed(problem, stock_splits(problem), queue)


def best_all_ramps_plan(problem: Problem, queue: bool = True) -> Plan | None:
    """The EE model served as is: a split after every ramp, all on one pool of one type, at the
    best batch size (ee-batch: under work-conserving dispatch each split runs the survivors of one
    batch), if any meets the SLO."""
    return _best_fixed(problem, all_ramps_splits(problem), queue)


def stock_splits(problem: Problem) -> list[list[int]]:
    return [[0, problem.num_blocks - 1]]


def all_ramps_splits(problem: Problem) -> list[list[int]]:
    ends = list(problem.ramp_blocks) + [problem.num_blocks - 1]
    return [[0 if i == 0 else ends[i - 1] + 1, e] for i, e in enumerate(ends)]


def fastest_plan(problem: Problem) -> Plan:
    """The stock plan with the least latency of its own batches, SLO or not: what a node serves when
    no plan meets the SLO by the cost model (its inputs then have the best chance of meeting it)."""
    best = None
    for d in problem.devices:
        for b in problem.batch_sizes if d.count else ():
            plan = Plan(b, [[0, problem.num_blocks - 1]], [Group(d.name, d.count, [0])], [], 0.0, 0.0, 0.0, [0.0])
            lam, latency, _ = evaluate(problem, plan, queue=False)
            if best is None or (latency, -lam) < best[0]:
                best = ((latency, -lam), plan)
    return finish_plan(problem, best[1])


def candidates(problem: Problem) -> dict[str, Plan | None]:
    """The baselines every solve is checked against: the stock plan and the EE model as is."""
    return {"stock": best_stock_plan(problem), "ee-batch": best_all_ramps_plan(problem)}


def fixed_plans(problem: Problem, splits: list[list[int]], batch_sizes: list[int]) -> list[Plan]:
    """These splits on one pool (all devices of one type) at each batch size, valued without the
    queue, where their own batches meet the SLO."""
    budget = problem.slo_s - problem.slack_s
    out = []
    for d in problem.devices:
        for b in batch_sizes if d.count else ():
            plan = fixed_plan(problem, splits, b, d.name, d.count)
            if plan.latency_s <= budget + EPS:
                out.append(plan)
    return out


def fixed_plan(problem: Problem, splits, batch: int, device: str, replicas: int, queue: bool = False) -> Plan:
    """These splits, the ramps at their ends enabled, on one pool of `replicas` devices of type
    `device` at `batch`, valued under `problem` (with the queue where asked)."""
    enabled = [problem.ramp_blocks.index(last) for _, last in splits[:-1]]
    plan = Plan(batch, [list(x) for x in splits], [Group(device, replicas, list(range(len(splits))))],
                enabled, 0.0, 0.0, 0.0, [0.0] * len(splits))
    return finish_plan(problem, plan, queue=queue)


def _best_fixed(problem: Problem, splits: list[list[int]], queue: bool) -> Plan | None:
    """The best plan with these splits on one pool, over batch sizes; with the queue, valued best
    bound first (the goodput without the queue over utilisation bounds it)."""
    plans = sorted(fixed_plans(problem, splits, problem.batch_sizes), key=lambda p: -p.goodput)
    if not (queue and problem.overheads.work_conserving):
        return plans[0] if plans else None
    best = None
    for plan in plans:
        if best is not None and plan.goodput / problem.utilisation <= best.goodput * (1 + 1e-12):
            break
        plan = finish_plan(problem, plan, queue=True)
        if plan.goodput > 0 and (best is None or plan.goodput > best.goodput * (1 + 1e-12)):
            best = plan
    return best
