"""The planner's dynamic program: max-stage pipelined plans for early-exit models.

Model of a plan (DESIGN.md section 4, extended to shared devices):
- Splits end at ramp blocks or the last block; stage s covers blocks i..j and
  takes t_s = sum p_c(k, B) + its exit (ramp or head) + the transfer of its
  input state (none for the first split), on its device type c.
- Consecutive splits form *groups*; a group runs on m devices of one type,
  each device running all of the group's splits in turn. A group of one split
  is the dedicated-replica case, one group of all splits the one-device case.
- At request rate lam, a group needs lam * W_g / B device-seconds per second,
  where W_g = sum over its splits of s_in * t_s (s_in: fraction of inputs
  reaching the split). It keeps up while that stays <= u * m. So the plan's
  goodput is the bottleneck min_g u * m_g * B / W_g (max-stage, not a sum).
- Worst-case latency at rate lam: sum_s t_s + B / lam (filling the first
  batch) + sum over later splits of B / (lam * s_in) (gathering survivors).
  It must stay within SLO - slack.

Solving. For a fixed B and lam the program is exact: a DP over split ends
whose state is the number of devices used per type, minimising latency, with
each group given the fewest devices that carry lam (ceil(lam W_g / (u B))).
A group's internal splitting is taken from a precomputed Pareto front of
(W, compute latency, wait coefficient). Max goodput: for each B, a descending
geometric scan of lam then bisection finds the highest lam with a feasible
plan; leftover devices then go to the bottleneck groups (water-filling),
which is optimal for the fixed structure. Min cost: the DP at lam = rate,
then the cheapest feasible device vector.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

from .plan import Group, Plan, SolveResult
from .problem import Problem

_EPS = 1e-9


@dataclass(frozen=True)
class _Front:
    """One way to split a group's block range: its totals and its splits."""

    work: float        # sum of s_in * t over the splits (device-seconds per input admitted)
    compute: float     # sum of t (seconds of latency)
    wait: float        # sum of waits in units of B / lam
    ends: tuple[int, ...]   # node indices where the splits end


class _Instance:
    """Precomputed stage times and group fronts for one batch size."""

    def __init__(self, problem: Problem, batch: int, front_cap: int):
        self.p, self.b = problem, batch
        self.ends = list(problem.ramp_blocks) + [problem.num_blocks - 1]
        self.nodes = [-1] + self.ends             # node i: the model state after block nodes[i]
        self.P = len(self.ends)
        self.s_in = [problem.survival_before(n + 1) for n in self.nodes[:-1]] + [0.0]
        self.fronts = [self._fronts(c, front_cap) for c in range(len(problem.devices))]

    def stage_time(self, c: int, i: int, j: int) -> float:
        """Seconds per batch of the split from node i to node j on device type c."""
        prof, b = self.p.devices[c].profile, self.b
        first, last = self.nodes[i] + 1, self.nodes[j]
        t = sum(prof.block(k, b) for k in range(first, last + 1))
        t += prof.head(b) if j == self.P else prof.ramp(self.p.ramp_blocks.index(last), b)
        if i > 0:
            t += prof.transfer(self.p.boundary_bytes[self.nodes[i]] * b)
        return t

    def wait(self, i: int) -> float:
        """Wait to fill a batch entering at node i, in units of B / lam."""
        return 1.0 if i == 0 else 1.0 / max(self.s_in[i], _EPS)

    def _fronts(self, c: int, cap: int) -> dict[tuple[int, int], list[_Front]]:
        fronts: dict[tuple[int, int], list[_Front]] = {}
        for j in range(1, self.P + 1):
            for i in range(j - 1, -1, -1):
                t = self.stage_time(c, i, j)
                single = _Front(self.s_in[i] * t, t, self.wait(i), (j,))
                cands = [single]
                if self.p.allow_sharing:
                    for k in range(i + 1, j):
                        tk = self.stage_time(c, i, k)
                        w0, wt = self.s_in[i] * tk, self.wait(i)
                        for f in fronts[(k, j)]:
                            cands.append(_Front(w0 + f.work, tk + f.compute, wt + f.wait, (k,) + f.ends))
                fronts[(i, j)] = _pareto(cands, cap)
        return fronts


def _pareto(cands: list[_Front], cap: int) -> list[_Front]:
    cands.sort(key=lambda f: (f.work, f.compute, f.wait))
    kept: list[_Front] = []
    for f in cands:
        if not any(g.compute <= f.compute + _EPS and g.wait <= f.wait + _EPS for g in kept):
            kept.append(f)
    return kept[:cap]


@dataclass
class _Choice:
    latency: float
    back: tuple | None      # (previous node, previous usage, type, front, replicas)


def _dp(inst: _Instance, lam: float, limits: list[int]) -> dict[tuple[int, ...], _Choice]:
    """Min-latency plans at rate lam: {devices used per type: best choice} at the last node."""
    p, b, u = inst.p, inst.b, inst.p.utilisation
    T = len(p.devices)
    states: list[dict[tuple[int, ...], _Choice]] = [dict() for _ in range(inst.P + 1)]
    states[0][(0,) * T] = _Choice(0.0, None)
    for j in range(1, inst.P + 1):
        out = states[j]
        for i in range(j):
            if not states[i]:
                continue
            for c in range(T):
                for f in inst.fronts[c][(i, j)]:
                    m = max(1, math.ceil(lam * f.work / (u * b) - _EPS))
                    if m > limits[c]:
                        continue
                    add = f.compute + f.wait * b / lam
                    for usage, ch in states[i].items():
                        if usage[c] + m > limits[c]:
                            continue
                        nu = usage[:c] + (usage[c] + m,) + usage[c + 1:]
                        lat = ch.latency + add
                        best = out.get(nu)
                        if best is None or lat < best.latency - _EPS:
                            out[nu] = _Choice(lat, (i, usage, c, f, m))
    return states


def _plan_from(inst: _Instance, states, usage: tuple[int, ...], lam: float) -> Plan:
    p = inst.p
    node, groups_rev = inst.P, []
    while node > 0:
        i, prev_usage, c, f, m = states[node][usage].back
        groups_rev.append((i, c, f, m))
        node, usage = i, prev_usage
    splits, stage_s, groups, works = [], [], [], []
    for i, c, f, m in reversed(groups_rev):
        idx, start = [], i
        for end in f.ends:
            splits.append([inst.nodes[start] + 1, inst.nodes[end]])
            stage_s.append(inst.stage_time(c, start, end))
            idx.append(len(splits) - 1)
            start = end
        groups.append(Group(p.devices[c].name, m, idx))
        works.append(f.work)
    enabled = [p.ramp_blocks.index(s[1]) for s in splits[:-1]]
    plan = Plan(inst.b, splits, groups, enabled, 0.0, 0.0, 0.0, stage_s)
    return plan, works


def evaluate(problem: Problem, plan: Plan) -> tuple[float, float, str]:
    """(goodput, worst-case latency at it, bottleneck) of `plan` under `problem`'s
    survival and profiles: used to re-value the running plan against a new forecast."""
    b, u = plan.batch, problem.utilisation
    by_name = {d.name: d for d in problem.devices}
    s_in = [problem.survival_before(s[0]) for s in plan.splits]
    t = []
    for gi, g in enumerate(plan.groups):
        prof = by_name[g.device].profile
        for i in g.splits:
            first, last = plan.splits[i]
            ti = sum(prof.block(k, b) for k in range(first, last + 1))
            ti += prof.head(b) if last == problem.num_blocks - 1 else prof.ramp(problem.ramp_blocks.index(last), b)
            if first > 0:
                ti += prof.transfer(problem.boundary_bytes[first - 1] * b)
            t.append((i, ti))
    t = [ti for _, ti in sorted(t)]
    caps = []
    for g in plan.groups:
        work = sum(s_in[i] * t[i] for i in g.splits)
        caps.append((u * g.replicas * b / work if work > 0 else math.inf, g))
    lam, g = min(caps, key=lambda x: x[0])
    waits = 1.0 + sum(1.0 / max(s, _EPS) for s in s_in[1:])
    latency = sum(t) + waits * b / lam
    return lam, latency, _describe_bottleneck(plan, g)


def _describe_bottleneck(plan: Plan, g: Group) -> str:
    blocks = f"blocks {plan.splits[g.splits[0]][0]}-{plan.splits[g.splits[-1]][1]}"
    return f"throughput of {blocks} on {g.replicas} x {g.device}"


def _waterfill(problem: Problem, plan: Plan, works: list[float]) -> None:
    """Give leftover devices (and budget) to the slowest groups of each type."""
    b, u = plan.batch, problem.utilisation
    price = {d.name: d.price_per_hour for d in problem.devices}
    left = {d.name: d.count for d in problem.devices}
    for g in plan.groups:
        left[g.device] -= g.replicas
    spend = sum(price[g.device] * g.replicas for g in plan.groups)
    heap = [(u * g.replicas * b / w, gi) for gi, (g, w) in enumerate(zip(plan.groups, works)) if w > 0]
    heapq.heapify(heap)
    while heap:
        cap, gi = heapq.heappop(heap)
        g = plan.groups[gi]
        if left[g.device] <= 0 or (problem.budget_per_hour is not None
                                   and spend + price[g.device] > problem.budget_per_hour + _EPS):
            continue
        g.replicas += 1
        left[g.device] -= 1
        spend += price[g.device]
        heapq.heappush(heap, (u * g.replicas * b / works[gi], gi))


def _finish(problem: Problem, plan: Plan) -> Plan:
    plan.goodput, plan.latency_s, plan.bottleneck = evaluate(problem, plan)
    price = {d.name: d.price_per_hour for d in problem.devices}
    plan.cost_per_hour = sum(price[g.device] * g.replicas for g in plan.groups)
    return plan


def _limits(problem: Problem) -> list[int]:
    return [d.count for d in problem.devices]


def _within_budget(problem: Problem, usage: tuple[int, ...]) -> bool:
    if problem.budget_per_hour is None:
        return True
    return sum(d.price_per_hour * n for d, n in zip(problem.devices, usage)) <= problem.budget_per_hour + _EPS


def _best_at(inst: _Instance, lam: float, limits: list[int]):
    """The lowest-latency feasible final state at rate lam, or None."""
    budget = inst.p.slo_s - inst.p.slack_s
    states = _dp(inst, lam, limits)
    ok = [(ch.latency, usage) for usage, ch in states[inst.P].items()
          if ch.latency <= budget + _EPS and _within_budget(inst.p, usage)]
    return (states, min(ok)[1]) if ok else None


def _upper_rate(inst: _Instance) -> float:
    """No plan can beat every device working on each input's blocks only, with no ramps."""
    p, b = inst.p, inst.b
    total = 0.0
    for d in p.devices:
        work = sum(p.survival_before(k) * d.profile.block(k, b) for k in range(p.num_blocks))
        total += p.utilisation * d.count * b / max(work, _EPS)
    return total * 1.01


def _max_goodput(inst: _Instance, limits: list[int], max_exact: int = 4000) -> tuple[Plan | None, bool]:
    """(best plan, whether the search was exact) at this batch size."""
    found = _coarse(inst, limits)
    lo = found[0] if found else 0.0
    # A plan's feasible rates form a window [lam_min, cap] that can be narrow
    # (filling a large batch nearly uses up the SLO), so a scan may step over
    # the optimum. The optimum is some group's capacity u*m*B/W: try those
    # candidates above the coarse answer, highest first; the first that has a
    # feasible plan is the optimum.
    cands = _candidates(inst, limits, lo, _upper_rate(inst))
    exact = len(cands) <= max_exact
    for lam in cands[:max_exact]:
        got = _best_at(inst, lam, limits)
        if got:
            found = (lam, got)
            break
    if not found:
        return None, exact
    lam, (states, usage) = found
    plan, works = _plan_from(inst, states, usage, lam)
    _waterfill(inst.p, plan, works)
    return _finish(inst.p, plan), exact


def _coarse(inst: _Instance, limits: list[int], scan: float = 0.85, steps: int = 80, bisections: int = 30):
    """A feasible rate and its DP result by a descending scan and bisection (a lower bound)."""
    hi = _upper_rate(inst)
    lam, found = hi, None
    for _ in range(steps):
        found = _best_at(inst, lam, limits)
        if found:
            break
        hi, lam = lam, lam * scan
    if not found:
        return None
    lo = lam
    for _ in range(bisections):
        if hi / lo < 1 + 1e-5:
            break
        mid = math.sqrt(lo * hi)
        got = _best_at(inst, mid, limits)
        if got:
            lo, found = mid, got
        else:
            hi = mid
    return lo, found


def _candidates(inst: _Instance, limits: list[int], lo: float, hi: float) -> list[float]:
    """Group capacities u*m*B/W in (lo, hi], highest first."""
    u, b, vals = inst.p.utilisation, inst.b, set()
    for c, fronts in enumerate(inst.fronts):
        for front in fronts.values():
            for f in front:
                if f.work <= 0:
                    continue
                base = u * b / f.work
                for m in range(max(1, math.floor(lo / base)), min(limits[c], math.floor(hi / base)) + 1):
                    if base * m > lo * (1 + 1e-12):
                        vals.add(base * m)
    return sorted(vals, reverse=True)


def _min_cost(inst: _Instance, rate: float, limits: list[int]) -> Plan | None:
    budget = inst.p.slo_s - inst.p.slack_s
    states = _dp(inst, rate, limits)
    ok = [(sum(d.price_per_hour * n for d, n in zip(inst.p.devices, usage)), ch.latency, usage)
          for usage, ch in states[inst.P].items() if ch.latency <= budget + _EPS]
    if not ok:
        return None
    plan, _ = _plan_from(inst, states, min(ok)[2], rate)
    return _finish(inst.p, plan)


def solve(problem: Problem, front_cap: int = 48) -> SolveResult:
    """The best plan for `problem` (objective "goodput" or "cost"), or why there is none."""
    start = time.perf_counter()
    problem.validate()
    best, limits, exact = None, _limits(problem), True
    for b in problem.batch_sizes:
        inst = _Instance(problem, b, front_cap)
        if problem.objective == "goodput":
            plan, was_exact = _max_goodput(inst, limits)
            exact = exact and was_exact
        else:
            plan = _min_cost(inst, problem.rate, limits)
        exact = exact and all(len(f) < front_cap for fr in inst.fronts for f in fr.values())
        if plan is not None and (best is None or _better(problem, plan, best)):
            best = plan
    elapsed = time.perf_counter() - start
    if best is None:
        return SolveResult(None, _why_none(problem, front_cap), elapsed, {"exact": exact})
    return SolveResult(best, best.bottleneck, elapsed, {"exact": exact})


def _better(problem: Problem, a: Plan, b: Plan) -> bool:
    if problem.objective == "goodput":
        return a.goodput > b.goodput * (1 + 1e-9)
    return (a.cost_per_hour, a.latency_s) < (b.cost_per_hour, b.latency_s)


def _why_none(problem: Problem, front_cap: int) -> str:
    """Name the constraint that rules every plan out."""
    if all(d.count == 0 for d in problem.devices):
        return "devices: no device is available"
    budget = problem.slo_s - problem.slack_s
    fastest = min(min(_Instance(problem, b, front_cap).stage_time(c, 0, len(problem.ramp_blocks) + 1)
                      for c in range(len(problem.devices))) for b in problem.batch_sizes)
    if fastest > budget:
        return (f"slo: the model alone computes for {fastest * 1000:.1f} ms at the smallest batch, "
                f"over the {budget * 1000:.1f} ms the SLO leaves")
    if problem.objective == "cost":
        many = [10_000] * len(problem.devices)
        for b in problem.batch_sizes:
            inst = _Instance(problem, b, front_cap)
            if _best_at(inst, problem.rate, many):
                return f"devices: {problem.rate:g} req/s needs more devices than are available"
        return (f"batch wait: at {problem.rate:g} req/s no batch size fills its batches "
                f"(and those of the survivors) within the SLO")
    return ("batch wait: at every rate the devices sustain, filling batches (and gathering survivors) "
            "takes longer than the SLO allows; allow smaller batch sizes or fewer splits")
