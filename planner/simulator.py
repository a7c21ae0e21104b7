"""SIMULATION: discrete-event replay of a plan against an arrival process and an exit trace.

For studying planner decisions at cluster scale on a laptop: every output
says SIMULATION, and nothing here touches a model or a device. What it
models, after the runtime (runtime/batcher.py, runtime/pipeline.py):

- requests arrive at given times; each carries its exit point with every
  ramp enabled (0..R-1 a ramp, R the head) from the exit trace, and leaves
  at the first enabled exit at or after it (the planner's assumption too);
- in front of every split a queue (the admission batcher for split 0, a
  rebatcher after it) sends B rows, or fewer when waiting longer would
  break the oldest row's SLO: at its SLO time minus the estimated time still
  to run (the remaining splits' batch times plus one hop each);
- each plan group is a pool of identical devices; a free device takes the
  most downstream split of its pool that has a batch due (the runtime's pump
  order), and runs it for the profile's time at the batch's actual size,
  interpolated, including the transfer of its input from another device;
- a sampled fraction of batches also runs the split's inner ramps;
- the cost model's overheads (cost_model.py): every batch pays the per-batch
  cost; every request first passes the node's event loop, one server taking
  the node's time per request, in arrival order; when the node shares the
  workers' cores, each pool's part of it (cost_model.pool_node_share) makes
  a batch of n rows at the pool's first split run n times that (per request
  reaching that split) longer.

Not modelled: worker restarts, admission limits (queues are unbounded:
overload shows as latency), cross-host links.
"""
from __future__ import annotations

import collections
import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .cost_model import SURVIVAL_FLOOR, pool_node_share, split_cost
from .errors import SimulationError
from .plan import Plan
from .problem import Problem

LABEL = "SIMULATION"


# --------------------------------------------------------------------------
# Arrivals and exit traces
# --------------------------------------------------------------------------

def poisson_arrivals(rate: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` arrival times (s) of a Poisson process of `rate` requests/s, from 0."""
    if rate <= 0 or count < 0:
        raise SimulationError(f"a Poisson process needs a positive rate and a count >= 0, got {rate!r}, {count!r}")
    return np.cumsum(rng.exponential(1.0 / rate, count))


def exit_distribution(survival: Sequence[float]) -> np.ndarray:
    """P(exit point = k) for k = 0..R from survival s_0..s_{R-1} (all ramps on)."""
    s = np.concatenate([[1.0], np.minimum.accumulate(np.clip(np.asarray(survival, dtype=float), 0, 1))])
    probs = np.concatenate([s[:-1] - s[1:], [s[-1]]])
    return np.clip(probs, 0, None) / probs.sum()


def exit_trace(survival: Sequence[float], count: int, rng: np.random.Generator) -> np.ndarray:
    """Exit points (all ramps on) of `count` requests drawn from one survival curve."""
    p = exit_distribution(survival)
    return rng.choice(len(p), size=count, p=p)


def switching_trace(arrivals: np.ndarray, easy: Sequence[float], hard: Sequence[float],
                    rng: np.random.Generator, easy_shares: Sequence[float] = (0.8, 0.5, 0.2)) -> np.ndarray:
    """Exit points of a workload whose easy:hard mix moves through `easy_shares` (80:20 -> 50:50 -> 20:80)
    in equal spans of time; `easy` and `hard` are the survival curves of the two kinds of input."""
    if len(arrivals) == 0:
        return np.zeros(0, dtype=np.int64)
    t0, t1 = float(arrivals[0]), float(arrivals[-1])
    span = (t1 - t0) / len(easy_shares) or 1.0
    phase = np.minimum(((arrivals - t0) / span).astype(int), len(easy_shares) - 1)
    is_easy = rng.random(len(arrivals)) < np.asarray(easy_shares)[phase]
    return np.where(is_easy, exit_trace(easy, len(arrivals), rng), exit_trace(hard, len(arrivals), rng))


def trace_survival(exits: np.ndarray, num_ramps: int) -> list[float]:
    """The survival curve (all ramps on) of an exit trace."""
    counts = np.bincount(exits, minlength=num_ramps + 1)
    left = np.cumsum(counts)[:num_ramps]
    return [float(1 - x / max(len(exits), 1)) for x in left]


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------

@dataclass
class SimReport:
    """SIMULATION results of one replay."""

    rate: float                         # offered requests/s (arrivals / their span)
    requests: int
    slo_s: float
    within_slo: float                   # fraction of requests answered within the SLO
    latency_ms: dict                    # p50, p90, p99, max
    throughput: float                   # answered requests/s over the replay
    utilisation: dict                   # per group "device x replicas (blocks)": mean busy fraction
    mean_batch_rows: list[float]        # per split
    partial_batches: list[float]        # per split: fraction of batches that left with fewer than B rows
    exits: list[int]                    # answered per exit point
    label: str = LABEL

    def describe(self) -> str:
        lat = self.latency_ms
        lines = [f"{LABEL} (not measured): {self.requests} requests at {self.rate:.1f} req/s offered; "
                 f"{self.within_slo:.2%} within the {self.slo_s * 1000:g} ms SLO; latency p50 {lat['p50']:.1f} "
                 f"p90 {lat['p90']:.1f} p99 {lat['p99']:.1f} max {lat['max']:.1f} ms; "
                 f"throughput {self.throughput:.1f} req/s"]
        for name, u in self.utilisation.items():
            lines.append(f"{LABEL}:   {name}: busy {u:.0%}")
        lines.append(f"{LABEL}:   rows per batch by split {[round(r, 1) for r in self.mean_batch_rows]}, "
                     f"partial batches {[f'{p:.0%}' for p in self.partial_batches]}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["label"] = LABEL
        return d


@dataclass
class GoodputReport:
    """SIMULATION: the highest Poisson rate at which at least `target` of requests meet the SLO."""

    goodput: float
    target: float
    at_goodput: SimReport | None
    tried: list[tuple[float, float]] = field(default_factory=list)    # (rate, fraction within SLO)
    label: str = LABEL

    def describe(self) -> str:
        head = (f"{LABEL} (not measured): goodput {self.goodput:.1f} req/s "
                f"(highest Poisson rate with >= {self.target:.0%} within the SLO)")
        return head + ("\n" + self.at_goodput.describe() if self.at_goodput else "")

    def to_json(self) -> dict:
        return {"label": LABEL, "goodput": self.goodput, "target": self.target, "tried": self.tried,
                "at_goodput": self.at_goodput.to_json() if self.at_goodput else None}


# --------------------------------------------------------------------------
# The replay
# --------------------------------------------------------------------------

class _Stage:
    def __init__(self, index: int, first: int, last: int, exit_point: int | None, group: int, time_at, sampled_at,
                 hop: float):
        self.index, self.first, self.last, self.exit_point, self.group = index, first, last, exit_point, group
        self.time_at, self.sampled_at, self.hop = time_at, sampled_at, hop
        self.queue: collections.deque = collections.deque()        # (arrival, exit point)
        self.budget = 0.0
        self.batches = self.rows = self.partial = 0


class _Replay:
    def __init__(self, problem: Problem, plan: Plan, sample_fraction: float, rng: np.random.Generator,
                 work_conserving: bool = True):
        self.p, self.plan, self.rng = problem, plan, rng
        self.f = sample_fraction
        self.work_conserving = work_conserving
        self.slo = problem.slo_s
        by_name = {d.name: d.profile for d in problem.devices}
        group_of = {i: gi for gi, g in enumerate(plan.groups) for i in g.splits}
        if sorted(group_of) != list(range(len(plan.splits))):
            raise SimulationError(f"every split needs exactly one group, got groups {plan.groups}")
        self.stages = []
        R = len(problem.ramp_blocks)
        for i, (first, last) in enumerate(plan.splits):
            g = plan.groups[group_of[i]]
            if g.device not in by_name:
                raise SimulationError(f"plan group device {g.device!r} is not among the problem's devices")
            prof = by_name[g.device]
            moved = i > 0 and not (group_of[i - 1] == group_of[i] and g.replicas == 1)
            exit_point = R if last == problem.num_blocks - 1 else (
                problem.ramp_blocks.index(last) if last in problem.ramp_blocks else None)
            time_at = _memo(lambda b, prof=prof, first=first, last=last, moved=moved:
                            split_cost(_no_sampling(problem), prof, first, last, b, moved).work_s)
            sampled_at = _memo(lambda b, prof=prof, first=first, last=last, moved=moved:
                               split_cost(_full_sampling(problem), prof, first, last, b, moved).worst_s)
            hop = prof.transfer_fixed_s
            self.stages.append(_Stage(i, first, last, exit_point, group_of[i], time_at, sampled_at, hop))
        for st in self.stages:   # what is still to run after entering this stage: the runtime's flush budget
            st.budget = sum(s.time_at(plan.batch) + s.hop for s in self.stages[st.index:])
        # devices: (group, index); per group the stages downstream first
        self.free = {gi: list(range(g.replicas)) for gi, g in enumerate(plan.groups)}
        self.busy_s = {gi: 0.0 for gi in range(len(plan.groups))}
        self.pool_stages = {gi: sorted(g.splits, reverse=True) for gi, g in enumerate(plan.groups)}
        # a pool's share of the node's CPU per request (cost_model.pool_node_share), charged on the
        # rows entering its first split: per row there, the share over the requests that reach it
        self.node_per_row = [0.0] * len(plan.splits)
        for g in plan.groups:
            first = min(g.splits)
            s_in = max(problem.survival_before(plan.splits[first][0]), SURVIVAL_FLOOR)
            self.node_per_row[first] = pool_node_share(problem, g.device, g.replicas) / s_in
        self.wake_at = {gi: None for gi in self.pool_stages}
        self.events: list = []
        self.seq = 0
        self.latency: list[float] = []
        self.exits = [0] * (R + 1)
        self.within = 0
        self.last_done = 0.0

    def _push(self, t: float, kind: int, data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def run(self, arrivals: np.ndarray, exits: np.ndarray) -> None:
        node_s, node_free = self.p.overheads.node_wall_s, -math.inf
        for t, e in zip(arrivals.tolist(), exits.tolist()):
            node_free = max(t, node_free) + node_s          # the node's loop admits in arrival order
            self._push(node_free, 0, (t, e))
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            if kind == 0:                                   # admitted: (arrival time, exit point)
                self.stages[0].queue.append(data)
            elif kind == 1:                                 # a batch finished
                self._finish(now, *data)
            self._pump(now)

    def _due_at(self, st: _Stage) -> float:
        """When the queue of `st` must send, with or without a full batch."""
        if len(st.queue) >= self.plan.batch:
            return -math.inf
        return min(a for a, _ in st.queue) + self.slo - st.budget

    def _pump(self, now: float) -> None:
        for gi, order in self.pool_stages.items():
            wake = math.inf
            for i in order:
                st = self.stages[i]
                while st.queue and self.free[gi]:
                    due = -math.inf if self.work_conserving else self._due_at(st)
                    if due > now:
                        wake = min(wake, due)
                        break
                    self._dispatch(now, st, gi)
            if wake < math.inf and self.free[gi] and self.wake_at[gi] != wake:
                self.wake_at[gi] = wake
                self._push(wake, 2, None)                   # a flush timer (a stale one only pumps)

    def _dispatch(self, now: float, st: _Stage, gi: int) -> None:
        n = min(self.plan.batch, len(st.queue))
        rows = [st.queue.popleft() for _ in range(n)]
        sampled = self.f > 0 and self.rng.random() < self.f
        t = st.sampled_at(n) if sampled else st.time_at(n)
        t += n * self.node_per_row[st.index]            # the node's CPU, taken from the workers' cores
        dev = self.free[gi].pop()
        self.busy_s[gi] += t
        st.batches += 1
        st.rows += n
        st.partial += n < self.plan.batch
        self._push(now + t, 1, (st.index, gi, dev, rows))

    def _finish(self, now: float, index: int, gi: int, dev: int, rows: list) -> None:
        self.free[gi].append(dev)
        st = self.stages[index]
        last = index == len(self.stages) - 1
        nxt = None if last else self.stages[index + 1].queue
        for arrived, e in rows:
            if last or (st.exit_point is not None and e <= st.exit_point):
                lat = now - arrived
                self.latency.append(lat)
                self.within += lat <= self.slo + 1e-12
                self.exits[st.exit_point] += 1
                self.last_done = max(self.last_done, now)
            else:
                nxt.append((arrived, e))


def _memo(fn):
    cache = {}

    def at(b: int) -> float:
        if b not in cache:
            cache[b] = fn(b)
        return cache[b]
    return at


def _no_sampling(problem: Problem) -> Problem:
    return Problem(**{**problem.__dict__, "sample_fraction": 0.0})


def _full_sampling(problem: Problem) -> Problem:
    return Problem(**{**problem.__dict__, "sample_fraction": 1.0})


def simulate(problem: Problem, plan: Plan, arrivals: np.ndarray, exits: np.ndarray, seed: int = 0,
             sample_fraction: float | None = None, work_conserving: bool = True) -> SimReport:
    """SIMULATION of `plan` serving requests at `arrivals` (s) with all-ramps exit points `exits`."""
    arrivals, exits = np.asarray(arrivals, dtype=float), np.asarray(exits, dtype=np.int64)
    if len(exits) < len(arrivals):
        raise SimulationError(f"the exit trace has {len(exits)} entries for {len(arrivals)} arrivals")
    if len(arrivals) == 0:
        raise SimulationError("nothing to replay: no arrivals")
    R = len(problem.ramp_blocks)
    if exits.min() < 0 or exits.max() > R:
        raise SimulationError(f"exit points must lie in 0..{R}, got {int(exits.min())}..{int(exits.max())}")
    f = problem.sample_fraction if sample_fraction is None else sample_fraction
    sim = _Replay(problem, plan, f, np.random.default_rng(seed), work_conserving)
    sim.run(arrivals, exits[:len(arrivals)])
    lat = np.asarray(sim.latency) * 1000
    span = float(arrivals[-1] - arrivals[0]) or 1e-9
    busy_span = max(sim.last_done - float(arrivals[0]), 1e-9)
    util = {}
    for gi, g in enumerate(plan.groups):
        blocks = ", ".join(f"{plan.splits[i][0]}-{plan.splits[i][1]}" for i in g.splits)
        util[f"{g.replicas} x {g.device} (blocks {blocks})"] = sim.busy_s[gi] / (g.replicas * busy_span)
    return SimReport(
        rate=(len(arrivals) - 1) / span if len(arrivals) > 1 else 0.0, requests=len(arrivals), slo_s=problem.slo_s,
        within_slo=sim.within / len(arrivals),
        latency_ms={k: float(np.percentile(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))} |
        {"max": float(lat.max())},
        throughput=len(lat) / busy_span, utilisation=util,
        mean_batch_rows=[st.rows / st.batches if st.batches else 0.0 for st in sim.stages],
        partial_batches=[st.partial / st.batches if st.batches else 0.0 for st in sim.stages],
        exits=sim.exits)


def find_goodput(problem: Problem, plan: Plan, survival: Sequence[float] | None = None,
                 duration_s: float | None = None, target: float = 0.99, lo: float | None = None,
                 hi: float | None = None, steps: int = 12, seed: int = 0, min_requests: int = 2000,
                 max_requests: int = 400_000, work_conserving: bool = True) -> GoodputReport:
    """SIMULATION: bisection on the Poisson rate for the highest with >= `target` within the SLO.

    Each rate replays `duration_s` of arrivals (default 30 SLOs: a replay shorter than a few SLOs
    ends before an overloaded queue has grown, and flatters the plan), at least `min_requests`,
    with exit points drawn from `survival` (default: the problem's); the same seed at every rate."""
    surv = problem.survival if survival is None else survival
    duration = 30 * problem.slo_s if duration_s is None else duration_s
    base = plan.goodput / problem.utilisation if plan.goodput > 0 else 100.0
    lo = base * 0.05 if lo is None else lo
    hi = base * 2.0 if hi is None else hi
    tried, best, best_report = [], 0.0, None

    def run(rate):
        rng = np.random.default_rng(seed)
        n = int(min(max(rate * duration, min_requests), max_requests))
        report = simulate(problem, plan, poisson_arrivals(rate, n, rng), exit_trace(surv, n, rng), seed=seed,
                          work_conserving=work_conserving)
        tried.append((rate, report.within_slo))
        return report
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        report = run(mid)
        if report.within_slo >= target:
            best, best_report, lo = mid, report, mid
        else:
            hi = mid
    return GoodputReport(best, target, best_report, tried)
