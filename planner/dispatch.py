"""Plans valued as the runtime dispatches them, and the per-batch cost that model needs.

The DP (dp.py) values a plan for deadline batching: every split runs full
batches of B, at the profile's compute time, and requests wait for batches to
fill. The runtime dispatches work-conservingly (batching.work_conserving):
a partial batch leaves as soon as its worker is free, so a split after a
ramp mostly runs the survivors of one upstream batch, and every batch also
pays a cost the profile does not see (the node's dispatch, the message to and
from the worker, gathering rows from slots, the event loop, CPU shared with
the node). Measured on the 2-core CPU machine: 0.9-1.7 ms per batch, and
1.3-1.9 rows per batch after the first split at B = 4.

On such a device a plan with more splits pays that cost more often and on
smaller batches, which the DP does not see: in the CPU benchmark it chose a
two-split plan on the 20:80 mix that it predicted at 185 req/s against
156 for the stock model; measured, the plan served 90 and the stock model 140.
This module re-values a plan under the runtime's dispatch:

- entry batch of split i: b_0 = B, b_i = clamp(B * s_i, 1, B) (s_i: the
  share of admitted requests entering split i), the survivors of one batch;
- seconds per batch: the profile's time at b_i plus `dispatch_s`;
- goodput: min over device pools of u * m / sum_i s_i * (t_i + dispatch_s) / b_i;
- latency: each split may queue behind one batch on its device, so twice its
  batch time; a plan over the SLO budget is worth 0.

The planner actor uses it to decide between the DP's plan and the stock plan
(choose_plan) and to value the running plan against a new one; the DP itself
is unchanged (its exact search stays exact for its own model).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from .dp import best_stock_plan, split_work, stage_times
from .plan import Plan
from .problem import Problem


def entry_batches(problem: Problem, plan: Plan) -> list[float]:
    """Rows per batch at each split's entry under work-conserving dispatch."""
    out = []
    for i, (first, _) in enumerate(plan.splits):
        s = problem.survival_before(first)
        out.append(float(plan.batch) if i == 0 else min(float(plan.batch), max(1.0, plan.batch * s)))
    return out


def dispatch_goodput(problem: Problem, plan: Plan, dispatch_s: float) -> tuple[float, float]:
    """(goodput req/s, latency s) of `plan` under work-conserving dispatch with `dispatch_s` per batch."""
    rows = entry_batches(problem, plan)
    times = [t + dispatch_s for t, _ in stage_times(problem, plan, rows)]
    s_in = [problem.survival_before(first) for first, _ in plan.splits]
    latency = 2.0 * sum(times)
    if latency > problem.slo_s - problem.slack_s:
        return 0.0, latency
    caps = []
    for g in plan.groups:
        work = sum(s_in[i] * times[i] / rows[i] for i in g.splits)
        caps.append(problem.utilisation * g.replicas / work if work > 0 else float("inf"))
    return min(caps), latency


@dataclass
class Choice:
    """The plan the planner actor should run, and why."""

    plan: Plan | None
    goodput: float               # under the dispatch model
    stock_goodput: float | None  # the best stock plan's, under the same model
    reason: str

    @property
    def falls_back(self) -> bool:
        """The guard chose the stock plan over the DP's splits."""
        return self.stock_goodput is not None and self.plan is not None and len(self.plan.splits) == 1

    def to_json(self) -> dict:
        return {"dispatch_goodput": round(self.goodput, 2), "reason": self.reason,
                "stock_dispatch_goodput": None if self.stock_goodput is None else round(self.stock_goodput, 2)}


def choose_plan(problem: Problem, plan: Plan | None, dispatch_s: float, min_gain: float) -> Choice:
    """The DP's plan, unless the stock plan serves as much within `min_gain` under the dispatch model.

    Ties go to the stock plan: it pays the per-batch cost once per request-batch and never runs
    a shrunken batch, so when the model cannot tell the two apart, it is the one that does not lose
    (the published E3 lost up to 23% on hard mixes by keeping its splits)."""
    stock = best_stock_plan(problem)
    if stock is None:
        if plan is None:
            return Choice(None, 0.0, None, "no plan meets the SLO")
        return Choice(plan, dispatch_goodput(problem, plan, dispatch_s)[0], None, "no stock plan meets the SLO")
    g_stock = dispatch_goodput(problem, stock, dispatch_s)[0]
    if plan is None or len(plan.splits) == 1:
        return Choice(stock, g_stock, g_stock, "stock plan (the DP found no split that pays)")
    g_plan = dispatch_goodput(problem, plan, dispatch_s)[0]
    if g_plan > g_stock * (1 + min_gain):
        return Choice(plan, g_plan, g_stock, f"splits pay: {g_plan:.1f} vs stock {g_stock:.1f} req/s")
    return Choice(stock, g_stock, g_stock,
                  f"stock plan: splits predicted {g_plan:.1f} vs stock {g_stock:.1f} req/s with "
                  f"{dispatch_s * 1000:.2f} ms per batch, not > {min_gain:.0%} better")


@dataclass(frozen=True)
class BatchTiming:
    """One batch that found its worker idle: its split's blocks, its rows, and its round trip."""

    first: int
    last: int
    rows: int
    round_trip_s: float


def per_batch_costs(problem: Problem, timings: Iterable[BatchTiming], device: int = 0) -> list[float]:
    """Round trip minus the profile's compute, per batch that was sent to an idle worker.

    Only such batches count: their round trip holds no queueing at the worker, so what exceeds the
    profile's compute is the cost of dispatching a batch (and of sharing the CPU with the node)."""
    prof = problem.devices[device].profile
    work: dict[tuple[int, int, int], float] = {}     # a few distinct (split, rows) among many batches
    out = []
    for t in timings:
        key = (t.first, t.last, t.rows)
        if key not in work:
            work[key] = split_work(problem, prof, t.first, t.last, t.rows)
        out.append(t.round_trip_s - work[key])
    return out


def blend(old: float, costs: Sequence[float], weight: float = 0.3) -> float:
    """Move the per-batch cost toward an interval's median, never below 0: one interval of a noisy
    2-core machine must not swing the plan."""
    if not costs:
        return old
    return max(0.0, (1 - weight) * old + weight * statistics.median(costs))
