"""Solving a planning problem: the DP's searches over batch sizes, the candidates valued with the
queue, the links' capacity, and why no plan when there is none.

The DP (dp.py) solves one batch size exactly for its model. Here:

- max goodput without the queue: batch sizes best-first by their upper bound, each pruned by the
  best plan so far (first the best stock plan, then the optimum with only every k-th ramp);
- with the queue (work-conserving dispatch, cost_model.py): a plan's goodput is the rate at which
  its first pool's queue keeps 99% of answers within the SLO, which is not additive over splits, so
  it is not a label of the DP. The DP solves the model without the queue exactly
  (`solve(queue=False)`, its latency the plan's own batches), and `solve` values candidates with
  the queue: at every batch size the DP's optimum when the plan's own batches may take 100, 75, 55,
  40 or 28% of the latency budget (the rest left to queue), and the stock and EE-as-is plans
  (baselines.py). Each candidate's goodput without the queue, over utilisation, bounds its goodput
  with it, so batch sizes and candidates run best bound first and stop when no bound beats the
  best. A heuristic over an exact inner solve: the optimum with the queue could be a plan the DP
  ranks below these, and the tests measure how far it falls;
- min cost at a rate, and max goodput within a price budget (dp.BatchSearch's passes);
- the links' capacity, which the DP leaves out: where it binds the plan found, the admitting
  host's devices alone are solved too, and the better by the whole model is the answer.
"""
from __future__ import annotations

import dataclasses
import math
import time

from .baselines import all_ramps_splits, best_stock_plan, fixed_plans, stock_splits
from .cost_model import link_capacity, node_capacity, split_cost, value
from .dp import EPS, MAX_ROUNDS, BatchSearch, finish_plan, label_budget
from .plan import Plan, SolveResult
from .problem import DeviceType, Problem
from .profiles import DeviceProfile


def solve(problem: Problem, queue: bool = True) -> SolveResult:
    """The best plan for `problem` (objective "goodput" or "cost"), or why there is none.

    `queue=False`: the exact optimum of the model without the queue and the links' capacity
    (cost_model.py). The DP leaves the links' capacity out; where it binds the plan the DP found,
    the best plan on the admitting host's devices alone is solved too, and the better of the two
    by the whole model is the answer."""
    start = time.perf_counter()
    result = _solve(problem, queue)
    if result.plan is not None and _links_bind(problem, result.plan):
        home = _home_problem(problem)
        alt = _solve(home, queue) if home is not None else None
        if alt is not None and alt.plan is not None and _better(problem, alt.plan, result.plan):
            alt.considered["home_only"] = f"the links bound {result.plan.goodput:.1f} req/s across hosts"
            result = alt
    result.solve_s = time.perf_counter() - start
    return result


def _links_bind(problem: Problem, plan: Plan) -> bool:
    """Whether the links' capacity is what limits `plan` (without a link it is not: no valuation)."""
    if math.isinf(link_capacity(problem, plan)):
        return False
    v = value(problem, plan, queue=False)
    return v.link_capacity < min([p.capacity for p in v.pools] + [v.node_capacity])


def _home_problem(problem: Problem) -> Problem | None:
    """`problem` with only the admitting host's devices (None if it has none)."""
    devices = [d if d.link is None else dataclasses.replace(d, count=0) for d in problem.devices]
    if all(d.count == 0 for d in devices):
        return None
    return dataclasses.replace(problem, devices=devices)


def _better(problem: Problem, a: Plan, b: Plan) -> bool:
    """Whether plan a beats plan b for the objective (both valued under `problem`)."""
    if problem.objective == "cost":
        carries = lambda p: p.goodput >= problem.rate * (1 - 1e-9)
        return carries(a) and (not carries(b) or a.cost_per_hour < b.cost_per_hour - 1e-12)
    return a.goodput > b.goodput * (1 + 1e-12)


def _solve(problem: Problem, queue: bool) -> SolveResult:
    start = time.perf_counter()
    problem.validate()
    if all(d.count == 0 for d in problem.devices):
        return SolveResult(None, "devices: no device is available (every count is 0)", time.perf_counter() - start,
                           {"exact": True})
    node_cap = node_capacity(problem)
    if problem.objective == "cost" and problem.rate > node_cap * (1 + 1e-12):
        return SolveResult(None, f"node: its event loop carries {node_cap:.1f} req/s at utilisation "
                           f"{problem.utilisation:g} ({problem.overheads.node_s_per_request * 1000:.3f} ms per "
                           f"request), under the {problem.rate:g} req/s asked", time.perf_counter() - start,
                           {"exact": True})
    if problem.objective == "cost":
        best, exact, per_batch, rounds = _min_cost(problem, queue)
    elif queue and problem.overheads.work_conserving:
        best, exact, per_batch, rounds = _queued_best(problem)
    else:
        best, exact, per_batch, rounds = _capacity_best(problem)
    elapsed = time.perf_counter() - start
    considered = {"exact": exact, "per_batch": per_batch, "rounds": rounds}
    if best is None:
        return SolveResult(None, _why_none(problem), elapsed, considered)
    return SolveResult(best, best.binding, elapsed, considered)


def _min_cost(problem: Problem, queue: bool) -> tuple[Plan | None, bool, dict, int]:
    """The cheapest plan that carries problem.rate, by the DP's model; its latency then reported
    with the queue at that rate."""
    searches = [BatchSearch(problem, b) for b in sorted(set(problem.batch_sizes))]
    best, per_batch = _coarse_incumbent(problem), {}
    for s in searches:
        plan = s.min_cost(problem.rate, best.cost_per_hour * (1 + 1e-12) + 1e-12 if best else math.inf)
        per_batch[s.bt.b] = plan.cost_per_hour if plan else None
        if plan is not None and (best is None or plan.cost_per_hour < best.cost_per_hour - 1e-12 or (
                plan.cost_per_hour <= best.cost_per_hour + 1e-12 and plan.latency_s < best.latency_s)):
            best = plan
    if best is not None and queue:
        best = finish_plan(problem, best, problem.rate, queue=True)
    return best, True, per_batch, sum(s.rounds for s in searches)


def _capacity_best(problem: Problem, incumbent: Plan | None = None) -> tuple[Plan | None, bool, dict, int]:
    """The plan of most goodput by the DP's model (the queue left out), exactly, within any budget."""
    searches = [BatchSearch(problem, b) for b in sorted(set(problem.batch_sizes))]
    best, exact, per_batch = _max_goodput(problem, searches, incumbent or _coarse_incumbent(problem))
    if best is not None and problem.budget_per_hour is not None and \
            best.cost_per_hour > problem.budget_per_hour + 1e-12:
        best, exact = _within_budget(problem, searches, best)
    return best, exact, per_batch, sum(s.rounds for s in searches)


# Shares of the latency budget the DP may spend on the plan's own batches; the rest is left to the
# queue. A plan that uses the whole budget has no room to queue, so its goodput under the queue is
# low; one with room left may carry more.
_BUDGET_SHARES = (1.0, 0.75, 0.55, 0.4, 0.28)


def _queued_best(problem: Problem) -> tuple[Plan | None, bool, dict, int]:
    """The plan of most goodput with the queue (cost_model.py), over a set of candidates: at every
    batch size, the DP's optimum when its own batches may take each share of the latency budget in
    _BUDGET_SHARES, the stock plan and the EE model as is. The DP's goodput over utilisation bounds
    what the queue allows, so batch sizes run best bound first, and stop when no bound beats the
    best plan valued so far. Not exact: the queue's optimum could be a plan the DP ranks below these."""
    rounds, per_batch, best = 0, {}, None
    tops = {}
    for b in sorted(set(problem.batch_sizes)):
        plan, _, _, r = _capacity_best(_with_budget_share(problem, b, 1.0))
        rounds += r
        fixed = [p for splits in (stock_splits(problem), all_ramps_splits(problem))
                 for p in fixed_plans(problem, splits, [b])]
        tops[b] = ([finish_plan(problem, plan)] if plan is not None else []) + fixed

    def bound(plans: list[Plan]) -> float:
        return max((p.goodput for p in plans), default=0.0) / problem.utilisation

    for b in sorted(tops, key=lambda b: -bound(tops[b])):
        if best is not None and bound(tops[b]) <= best.goodput * (1 + 1e-12):
            break
        plans = list(tops[b])
        for share in _BUDGET_SHARES[1:]:
            plan, _, _, r = _capacity_best(_with_budget_share(problem, b, share))
            rounds += r
            if plan is not None:
                plans.append(finish_plan(problem, plan))
        seen = set()
        for plan in sorted(plans, key=lambda p: -p.goodput):
            if _plan_key(plan) in seen or (best is not None and
                                           plan.goodput / problem.utilisation <= best.goodput * (1 + 1e-12)):
                continue
            seen.add(_plan_key(plan))
            plan = finish_plan(problem, plan, queue=True)
            per_batch[b] = max(per_batch.get(b) or 0.0, plan.goodput)
            if plan.goodput > 0 and (best is None or plan.goodput > best.goodput * (1 + 1e-12)):
                best = plan
    return best, False, per_batch, rounds


def _with_budget_share(problem: Problem, b: int, share: float) -> Problem:
    """`problem` at batch size b with only `share` of the DP's latency budget for the plan's batches."""
    budget = label_budget(problem) * share
    slo = budget + problem.slack_s + problem.overheads.node_wall_s
    return dataclasses.replace(problem, batch_sizes=[b], slo_s=slo)


def _plan_key(plan: Plan) -> tuple:
    return (plan.batch, tuple(map(tuple, plan.splits)), tuple((g.device, g.replicas, tuple(g.splits))
                                                              for g in plan.groups))


def _max_goodput(problem: Problem, searches: list[BatchSearch], incumbent: Plan | None
                 ) -> tuple[Plan | None, bool, dict]:
    """Best-first over batch sizes. The best stock plan (one split on one type) is a cheap first
    incumbent that prunes every label unable to beat it; each round of a batch size lowers its upper
    bound rho; the batch size with the highest bound runs next, until no bound beats the best plan."""
    best = best_stock_plan(problem, queue=False)
    if incumbent is not None and (best is None or incumbent.goodput > best.goodput):
        best = incumbent
    for s in searches:
        s.start_goodput()
    open_ = list(searches)
    exact = True
    while open_:
        open_.sort(key=lambda s: -s.rho)
        s = open_[0]
        beat = best.goodput if best else 0.0
        if best is not None and s.rho <= beat * (1 + 1e-12):
            break                                   # no batch size left can beat the best plan
        s.goodput_round(beat)
        if s.done:
            open_.remove(s)
            if s.plan is not None and (best is None or s.plan.goodput > best.goodput * (1 + 1e-12)):
                best = s.plan
        elif s.rounds >= MAX_ROUNDS:
            open_.remove(s)
            exact = False
    per_batch = {s.bt.b: (s.plan.goodput if s.plan else None) if s.done else f"bound {s.rho:.6g}"
                 for s in searches}
    return best, exact, per_batch


_COARSE_RAMPS = 4


def _coarse_incumbent(problem: Problem) -> Plan | None:
    """A good plan found fast, to prune the exact search: the optimum of the same problem with only
    every k-th ramp (at most _COARSE_RAMPS), re-valued under the full problem. Label counts grow
    steeply with the ramps while the cut from a near-optimal plan removes most labels (96 blocks on
    three types: 42 s without an incumbent, 0.2 s with one within 3% of the optimum)."""
    R = len(problem.ramp_blocks)
    if R <= _COARSE_RAMPS:
        return None
    step = math.ceil(R / _COARSE_RAMPS)
    keep = list(range(step - 1, R, step))
    devices = [DeviceType(d.name, d.count, d.price_per_hour, DeviceProfile(
        d.profile.device, d.profile.batch_sizes, d.profile.block_s, [d.profile.ramp_s[k] for k in keep],
        d.profile.head_s, d.profile.transfer_fixed_s, d.profile.transfer_s_per_byte, d.profile.meta))
        for d in problem.devices]
    coarse = Problem(**{**problem.__dict__, "ramp_blocks": [problem.ramp_blocks[k] for k in keep],
                        "survival": [problem.survival[k] for k in keep], "devices": devices})
    plan = _capacity_best(coarse, incumbent=None)[0] if coarse.objective == "goodput" else solve(coarse).plan
    if plan is None:
        return None
    plan.enabled_ramps = [problem.ramp_blocks.index(s[1]) for s in plan.splits[:-1]]
    rate = problem.rate if problem.objective == "cost" else None
    plan = finish_plan(problem, plan, rate)
    ok = plan.latency_s <= problem.slo_s - problem.slack_s + EPS and (rate is None or plan.goodput >= rate)
    return plan if ok else None



def _within_budget(problem: Problem, searches: list[BatchSearch], unbounded: Plan) -> tuple[Plan | None, bool]:
    """Most goodput from devices within the price budget. Each batch size starts from an upper bound
    left by the search without the budget: its own optimum, its last rho, or the overall optimum."""
    def bound(s: BatchSearch) -> float:
        if s.done:
            return s.plan.goodput if s.plan is not None else unbounded.goodput
        return s.rho
    best, exact = None, True
    for s in sorted(searches, key=lambda s: -bound(s)):
        if best is not None and bound(s) <= best.goodput * (1 + 1e-12):
            break
        plan, ok = s.max_goodput_within_budget(bound(s))
        exact = exact and ok
        if plan is not None and (best is None or plan.goodput > best.goodput * (1 + 1e-12)):
            best = plan
    return best, exact



# --------------------------------------------------------------------------
# Why no plan
# --------------------------------------------------------------------------

def _why_none(problem: Problem) -> str:
    """Name the constraint that rules every plan out."""
    budget = problem.slo_s - problem.slack_s
    avail = [d for d in problem.devices if d.count > 0]
    b0 = min(problem.batch_sizes)
    fastest = min(split_cost(problem, d.profile, 0, problem.num_blocks - 1, b0, False).worst_s for d in avail)
    if fastest > budget:
        return (f"slo: the model alone computes for {fastest * 1000:.1f} ms at batch {b0} on the fastest device, "
                f"over the {budget * 1000:.1f} ms the SLO leaves (slo_ms - slack_ms)")
    if problem.objective == "goodput" and problem.budget_per_hour is not None:
        cheapest = min(d.price_per_hour for d in avail)
        if cheapest > problem.budget_per_hour:
            return f"budget: {problem.budget_per_hour:g}/h buys no device (the cheapest costs {cheapest:g}/h)"
    if problem.objective == "cost":
        rate = problem.rate
        one = min(split_cost(problem, d.profile, 0, problem.num_blocks - 1, b0, False).worst_s
                  for d in avail) + b0 / rate
        if one > budget:
            return (f"rate: at {rate:g} req/s even a batch of {b0} waits {b0 / rate * 1000:.1f} ms to fill, "
                    f"over what the SLO leaves after compute; allow smaller batches")
        more = Problem(**{**problem.__dict__, "devices": [type(d)(d.name, max(d.count, 1) * 1_000_000,
                                                                 d.price_per_hour, d.profile)
                                                          for d in problem.devices]})
        if any(BatchSearch(more, b).min_cost(rate) is not None for b in problem.batch_sizes):
            return f"devices: {rate:g} req/s needs more devices than are available"
        return (f"survival: at {rate:g} req/s gathering batches of survivors takes longer than the SLO allows "
                f"(survival {problem.survival}); allow smaller batches")
    return ("batch wait: at every batch size, filling batches (and gathering survivors) at the rate the devices "
            "sustain takes longer than the SLO allows; allow smaller batch sizes or more slack")
