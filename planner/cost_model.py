"""The one cost model: what a plan does on the node that runs it.

Every place that values a plan uses this module: the DP (dp.py optimises
exactly this model, in matrix form; the brute force in the tests checks it),
the planner actor's switch and fall-back decisions, the simulator's service
times, `bin/e3-plan` and `GET /e3/plan` (both show each term).

Per split i of a plan at batch size B, with s_i the share of admitted
requests that enter it:

- rows: B for the first split. After a ramp, under work-conserving dispatch
  (`Overheads.work_conserving`: a partial batch leaves as soon as a worker is
  free, which is what the runtime does), the survivors of one upstream batch,
  clamp(B * s_i, 1, B), for a split in the same pool as the one before it; a
  pool's first split behind another pool's takes B (at its capacity it is
  backlogged and its rebatcher merges survivors of several upstream batches;
  the simulator's replay fills its batches the same way). Under deadline
  batching, B.
- seconds per batch: the profile's blocks and exit (ramp or head) at those
  rows, times the measured compute scale (`compute_scale`: what the workers'
  compute took over what the profile says at the same rows), the inner ramps on the sampled fraction of batches (fully in the
  worst-case latency), the boundary transfer when its input comes from
  another device, plus the per-batch cost the profile does not see
  (`per_batch_s`: dispatch, messages, gathering rows from slots; and
  `worker_s_per_batch`: the worker's compute that does not grow with rows;
  both measured live by the planner actor).
- work per admitted request: s_i * seconds / rows.

A pool of m devices (a plan group) keeps up while rate * (W + c_g) <= u * m,
where W is the summed work of its splits and c_g its part of the node's CPU
per request (HTTP, decoding, tokenizing, admission, answering) when the node
shares the workers' cores (`node_shares_cores`: then every second the node
computes is a second a worker does not). The scheduler spreads the node over
the cores of the admitting host's D devices, so a pool of m of them bears
c * m / D (`pool_node_share`) and a pool on another host none. The node's event loop is one more server:
rate * (node_s_per_request + node_s_per_batch * b) <= u * node_core_share,
where b is the plan's batches per request (every split's batches count: on a
node-bound model more splits cost the loop more) and node_core_share the share
of a core the loop gets when it has work, measured. The DP leaves the batch
term out (it would be a third coordinate of its fronts); the candidates it
returns, the baselines and the running plan are valued with it (options.py).
The links to other hosts are one more server: every batch of a split on
another host sends its input rows there and brings its survivors' rows back
through the admitting node (hub and spoke), so the node's end carries each
link's bytes at that link's measured seconds per byte: rate * K <= u, where K
sums s_i * in-bytes + s_out * out-bytes over the remote splits, times their
link's seconds per byte (`link_capacity`; a message's fixed time is latency,
not occupancy). The DP leaves this term out as it does the loop's batch term
(it is a sum over pools, a third coordinate); its candidates, the baselines
and the running plan are valued with it. Goodput is the least of these
capacities.

Latency under work-conserving dispatch (what the runtime does) is a queue
(queueing.py): the pool that runs the first split is a bulk-service queue
whose batch of n entry rows costs the pool the work of everything those rows
cause in its splits, and whose deepest row is answered after the batch times
of its path. The plan's goodput is then the least of its capacities and the
highest rate at which `slo_quantile` of the answers (99%) come within the
SLO less its slack and the node's own time; its latency is that quantile at
the rate. The first pool is limited by its queue alone (at the edge the
queue gives, not `utilisation`: goodput is the rate a measurement finds),
later pools by their capacity at utilisation u, their splits' latency taken
as two batches each (one ahead, their own). `queue=False` values the plan
without the queue: its own batches once each on the latency path, what the
DP screens and optimises (dp.py; a necessary condition of the queue's).

Under deadline batching the latency is the seconds per batch plus the waits
to fill the first batch (B / rate) and to gather B survivors at every later
split (B / (rate * s_i)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .queueing import BulkQueue

if TYPE_CHECKING:
    from .plan import Plan
    from .problem import DeviceType, Problem

SURVIVAL_FLOOR = 1e-9      # survival below this counts as none: its gather wait is (near) infinite
# The queue's latency quantile is searched up to this many SLOs (infinite past it): every decision
# compares it with the SLO, and the chain's states, so its solve, grow with the reach (at 10 SLOs a
# digits chain held 2,000-4,000 states and the solves took most of a 2-3 s plan).
LATENCY_HORIZON = 2.0


@dataclass
class Overheads:
    """What serving costs beyond the profile's compute, on the node that serves the plan.

    All zero (the default) is the pure compute model of DESIGN.md section 4."""

    per_batch_s: float = 0.0          # per batch, beyond the profile (dispatch, messages, slots)
    worker_s_per_batch: float = 0.0   # per batch, the workers' compute beyond the scaled profile (a fixed
                                      # part each batch pays however many rows it has)
    node_s_per_request: float = 0.0   # the node's CPU per request (HTTP, decoding, admission, answering)
    node_shares_cores: bool = False   # the node's CPU comes out of the workers' (cores oversubscribed)
    work_conserving: bool = False     # partial batches leave when a worker is idle (the runtime's dispatch)
    compute_scale: float = 1.0        # the workers' measured compute over the profile's, at the same rows
                                      # (cores shared with the node and other processes slow every op)
    node_s_per_batch: float = 0.0     # the node's CPU per batch of any split (dispatch, gathering and
                                      # scattering rows, the worker's messages), on its loop
    node_entry_rows: float = 0.0      # rows per first-split batch at the heaviest load measured (0: full
                                      # batches): where the node binds first, batches stay small
    node_core_share: float = 1.0      # the share of a core the node's loop gets when it has work: its run
                                      # time over run time + run-queue wait (cores shared with the workers
                                      # and a load client leave a busy loop less than one)
    link_capacity: bool = True        # the bytes a plan moves to and from other hosts occupy their links,
                                      # all of them through the admitting node's end (hub and spoke)

    def to_json(self) -> dict:
        return {"per_batch_ms": self.per_batch_s * 1000, "node_ms_per_request": self.node_s_per_request * 1000,
                "node_shares_cores": self.node_shares_cores, "work_conserving": self.work_conserving,
                "compute_scale": self.compute_scale, "node_core_share": self.node_core_share,
                "node_ms_per_batch": self.node_s_per_batch * 1000, "node_entry_rows": self.node_entry_rows,
                "link_capacity": self.link_capacity, "worker_ms_per_batch": self.worker_s_per_batch * 1000}

    @property
    def batch_fixed_s(self) -> float:
        """Seconds every batch of a split costs whatever its rows: dispatch and the worker's fixed part."""
        return self.per_batch_s + self.worker_s_per_batch

    @property
    def node_wall_s(self) -> float:
        """Wall seconds the node's loop takes per request: its CPU at the share of a core it gets."""
        return self.node_s_per_request / self.node_core_share

    @property
    def node_share_s(self) -> float:
        """Seconds of the workers' time the node takes per request, over all its host's devices."""
        return self.node_s_per_request if self.node_shares_cores else 0.0


def node_share_per_device(problem: "Problem", device: "DeviceType") -> float:
    """The node's CPU per request that one device of type `device` gives up: the node's share spread
    over its host's devices (the admitting host's; a device on another host gives none)."""
    c = problem.overheads.node_share_s
    if c <= 0 or device.link is not None:          # a link: another host (problem.py checks it)
        return 0.0
    local = sum(d.count for d in problem.devices if d.link is None)
    return c / local if local > 0 else 0.0


def pool_node_share(problem: "Problem", device_name: str, replicas: int) -> float:
    """The node's CPU per request taken from a pool of `replicas` devices of type `device_name`."""
    device = next(d for d in problem.devices if d.name == device_name)
    return replicas * node_share_per_device(problem, device)


def entry_rows(overheads: Overheads, batch: int, survival_in: float, first_split: bool) -> float:
    """Rows per batch at a split's entry."""
    if first_split or not overheads.work_conserving:
        return float(batch)
    return min(float(batch), max(1.0, batch * survival_in))


@dataclass
class SplitCost:
    """Seconds per batch of one split, by term, at the rows it sees."""

    rows: float
    compute_s: float        # blocks
    exit_s: float           # its exit ramp or the head
    sampled_s: float        # inner ramps, averaged over batches (sample fraction f)
    sampled_worst_s: float  # inner ramps on a sampled batch (0 when f = 0)
    transfer_s: float       # the boundary moved in from another device
    per_batch_s: float      # Overheads.batch_fixed_s: dispatch and the worker's fixed part
    link_s: float = 0.0     # to and from another host: the input rows out, survivors and answers back


    @property
    def work_s(self) -> float:
        """Device seconds per batch (what capacity is made of)."""
        return self.compute_s + self.exit_s + self.sampled_s + self.transfer_s + self.per_batch_s

    @property
    def worst_s(self) -> float:
        """Seconds of the slowest batch (a sampled one), its link included: the link's time is
        latency, not the device's work (the link's reader and writer run beside the worker)."""
        return self.compute_s + self.exit_s + self.sampled_worst_s + self.transfer_s + self.per_batch_s + self.link_s


def split_cost(problem: "Problem", prof, first: int, last: int, rows: float, moved: bool,
               link=None) -> SplitCost:
    """One batch of `rows` rows through blocks first..last on a device with profile `prof`, over
    `link` (a problem.Link) when the device is on another host."""
    R, k = problem.ramp_blocks, problem.overheads.compute_scale
    blocks = k * float(prof.blocks_at(rows)[first:last + 1].sum())
    if last == problem.num_blocks - 1:
        exit_s = k * prof.head(rows)
    else:
        exit_s = k * prof.ramp(R.index(last), rows) if last in R else 0.0
    f = problem.sample_fraction
    inner = k * sum(prof.ramp(k_, rows) for k_, rb in enumerate(R) if first <= rb < last) if f > 0 else 0.0
    move = prof.transfer(problem.boundary_bytes[first - 1] * rows) if moved else 0.0
    return SplitCost(rows, blocks, exit_s, f * inner, inner, move, problem.overheads.batch_fixed_s,
                     0.0 if link is None else link_cost(problem, link, first, last, rows))


def _link_row_bytes(problem: "Problem", first: int, last: int) -> tuple[int, int]:
    """Bytes of one row split first..last sends over a link (its input) and of one survivor's row it
    brings back (none after the last block)."""
    sent = problem.boundary_bytes[first - 1] if first > 0 else problem.input_bytes
    return sent, problem.boundary_bytes[last] if last < problem.num_blocks - 1 else 0


def link_cost(problem: "Problem", link, first: int, last: int, rows: float) -> float:
    """Seconds a batch of split first..last spends on a link: its input rows there, then one message
    back with the answers and the survivors' rows (none after the last block)."""
    sent, back = _link_row_bytes(problem, first, last)
    s_in, s_out = problem.survival_before(first), problem.survival_before(last + 1)
    onward = s_out / s_in if s_in > 0 else 0.0
    return link.transfer(sent * rows) + link.transfer(back * rows * onward)


def link_s_per_request(problem: "Problem", plan: "Plan") -> float:
    """Seconds of link the admitting node's end carries per admitted request under `plan`: per split
    on another host, the rows sent there (s_in of requests, at its input's bytes) and the survivors'
    rows back (s_out, at its last block's boundary), at its link's seconds per byte."""
    by_name = {d.name: d for d in problem.devices}
    group_of = _group_of(plan)
    total = 0.0
    for i, (first, last) in enumerate(plan.splits):
        link = by_name[plan.groups[group_of[i]].device].link
        if link is not None:
            sent, back = _link_row_bytes(problem, first, last)
            total += link.s_per_byte * (problem.survival_before(first) * sent + problem.survival_before(last + 1) * back)
    return total


def link_capacity(problem: "Problem", plan: "Plan") -> float:
    """Requests/s the links to other hosts carry under `plan` at the problem's utilisation (inf when
    it moves nothing over a link, or `overheads.link_capacity` is off)."""
    k = link_s_per_request(problem, plan) if problem.overheads.link_capacity else 0.0
    return problem.utilisation / k if k > 0 else math.inf


def _group_of(plan: "Plan") -> dict[int, int]:
    return {i: gi for gi, g in enumerate(plan.groups) for i in g.splits}


def moved_in(plan: "Plan", i: int) -> bool:
    """Whether split i's input comes from another device: always across groups, and inside a group
    of several devices (the next batch may run on another one)."""
    if i == 0:
        return False
    group_of = _group_of(plan)
    return not (group_of[i - 1] == group_of[i] and plan.groups[group_of[i]].replicas == 1)


def split_costs(problem: "Problem", plan: "Plan", rows: list[float] | None = None) -> list[SplitCost]:
    """Every split of `plan` on its device, at the rows the model expects (or at `rows`)."""
    by_name = {d.name: d for d in problem.devices}
    group_of = _group_of(plan)
    ov = problem.overheads
    out = []
    for i, (first, last) in enumerate(plan.splits):
        # a pool's first split after another pool's is backlogged at that pool's capacity: full batches
        full = i == 0 or group_of[i - 1] != group_of[i]
        n = entry_rows(ov, plan.batch, problem.survival_before(first), full) if rows is None else rows[i]
        dev = by_name[plan.groups[group_of[i]].device]
        out.append(split_cost(problem, dev.profile, first, last, n, moved_in(plan, i), dev.link))
    return out


@dataclass
class PoolValue:
    device: str
    replicas: int
    splits: list[int]
    work_s_per_request: float     # sum over its splits of s_i * seconds / rows
    node_share_s: float           # the node's CPU per request taken from these devices
    capacity: float               # u * replicas / (work + node share)


@dataclass
class Valuation:
    """A plan under the cost model, term by term."""

    goodput: float
    latency_s: float
    binding: str
    survival_in: list[float]
    splits: list[SplitCost]
    pools: list[PoolValue]
    node_capacity: float          # u / node seconds per request (inf when not counted)
    overheads: Overheads = field(default_factory=Overheads)
    queue_rate: float | None = None   # the rate up to which the queue keeps slo_quantile within the SLO
    link_capacity: float = math.inf   # u / link seconds per request (inf: nothing crosses a link)

    def to_json(self) -> dict:
        ms = lambda s: round(s * 1000, 4)
        return {"goodput": _finite(self.goodput), "latency_ms": ms(self.latency_s), "binding": self.binding,
                "node_capacity": _finite(self.node_capacity), "link_capacity": _finite(self.link_capacity),
                "overheads": self.overheads.to_json(),
                "queue_rate": None if self.queue_rate is None else _finite(self.queue_rate),
                "splits": [{"survival_in": round(s_in, 4), "rows": round(c.rows, 3), "compute_ms": ms(c.compute_s),
                            "exit_ms": ms(c.exit_s), "sampled_ramps_ms": ms(c.sampled_s),
                            "transfer_ms": ms(c.transfer_s), "per_batch_ms": ms(c.per_batch_s),
                            "link_ms": ms(c.link_s), "work_ms_per_batch": ms(c.work_s)}
                           for s_in, c in zip(self.survival_in, self.splits)],
                "pools": [{**asdict(p), "work_ms_per_request": ms(p.work_s_per_request),
                           "node_share_ms": ms(p.node_share_s), "capacity": _finite(p.capacity)}
                          for p in self.pools]}

    def describe(self) -> list[str]:
        """Lines for a terminal: every term of the prediction."""
        ov = self.overheads
        lines = [f"predicted by the cost model: {self.goodput:.1f} req/s, latency "
                 f"{self.latency_s * 1000:.1f} ms ({self.binding})",
                 f"  overheads: {ov.per_batch_s * 1000:.2f} ms per batch + the worker's fixed "
                 f"{ov.worker_s_per_batch * 1000:.2f}, node {ov.node_s_per_request * 1000:.3f} "
                 f"ms per request + {ov.node_s_per_batch * 1000:.3f} ms per batch on its loop "
                 f"({'shares' if ov.node_shares_cores else 'does not share'} the workers' cores), "
                 f"{'work-conserving' if ov.work_conserving else 'deadline'} batching, compute x "
                 f"{ov.compute_scale:.2f} the profile's, the node's loop gets {ov.node_core_share:.0%} of a core"]
        for i, (s_in, c) in enumerate(zip(self.survival_in, self.splits)):
            lines.append(f"  split {i}: {s_in:.1%} of requests enter, {c.rows:.1f} rows per batch: compute "
                         f"{c.compute_s * 1000:.2f} + exit {c.exit_s * 1000:.2f} + sampled ramps "
                         f"{c.sampled_s * 1000:.2f} + transfer {c.transfer_s * 1000:.2f} + per batch "
                         f"{c.per_batch_s * 1000:.2f} = {c.work_s * 1000:.2f} ms"
                         + (f"; link to its host {c.link_s * 1000:.2f} ms more latency" if c.link_s else ""))
        for p in self.pools:
            lines.append(f"  pool {p.replicas} x {p.device} (splits {p.splits}): {p.work_s_per_request * 1000:.3f} "
                         f"ms of work + {p.node_share_s * 1000:.3f} ms of node per request -> {p.capacity:.1f} req/s")
        if math.isfinite(self.node_capacity):
            lines.append(f"  node event loop: {self.node_capacity:.1f} req/s")
        if math.isfinite(self.link_capacity):
            lines.append(f"  links to other hosts (all through this node's end): {self.link_capacity:.1f} req/s")
        if self.queue_rate is not None:
            lines.append(f"  queue at the first pool: {self.queue_rate:.1f} req/s with the SLO quantile met "
                         f"(latency {self.latency_s * 1000:.1f} ms at {self.goodput:.1f} req/s)")
        return lines


def _finite(x: float):
    return round(x, 3) if math.isfinite(x) else None


def value(problem: "Problem", plan: "Plan", rate: float | None = None,
          rows: list[float] | None = None, queue: bool = True) -> Valuation:
    """`plan` under the cost model; latency at `rate`, or at the plan's own goodput.

    `rows` replaces the expected rows per split (the planner actor passes what it measured);
    `queue=False` leaves the queue out (the DP's model: see the module's docstring)."""
    ov, u = problem.overheads, problem.utilisation
    costs = split_costs(problem, plan, rows)
    s_in = [problem.survival_before(first) for first, _ in plan.splits]
    queued = queue and ov.work_conserving
    pools = []
    for gi, g in enumerate(plan.groups):
        work = sum(s_in[i] * costs[i].work_s / costs[i].rows for i in g.splits)
        node = pool_node_share(problem, g.device, g.replicas)
        total = work + node
        share = 1.0 if queued and gi == 0 else u
        pools.append(PoolValue(g.device, g.replicas, list(g.splits), work, node,
                               share * g.replicas / total if total > 0 else math.inf))
    node_cap, link_cap = node_capacity(problem, plan), link_capacity(problem, plan)
    worst = min(pools, key=lambda p: p.capacity)
    goodput = min(worst.capacity, node_cap, link_cap)
    if goodput == worst.capacity:
        binding = _pool_binding(plan, worst)
    elif goodput == node_cap:
        binding = "the node's event loop"
    else:
        binding = (f"the links to other hosts: {link_s_per_request(problem, plan) * 1000:.3f} ms of link "
                   f"per request through this node's end")
    if queued:
        q = plan_queue(problem, plan)
        deadline = problem.slo_s - problem.slack_s - ov.node_wall_s
        queue_rate = q.max_rate(deadline, 1.0 - problem.slo_quantile)
        if queue_rate < goodput:
            goodput = queue_rate
            binding = (f"the queue: {problem.slo_quantile:.0%} of answers within the SLO up to "
                       f"{queue_rate:.1f} req/s")
        at = rate if rate is not None else goodput
        latency = ov.node_wall_s + q.latency_quantile(at, problem.slo_quantile, LATENCY_HORIZON * problem.slo_s)
        return Valuation(goodput, latency, binding, s_in, costs, pools, node_cap, ov, queue_rate, link_cap)
    latency = sum(c.worst_s for c in costs) + ov.node_wall_s
    if not ov.work_conserving:
        at = rate if rate is not None else goodput
        waits = 1.0 + sum(1.0 / max(s, SURVIVAL_FLOOR) for s in s_in[1:])
        latency += waits * plan.batch / at
    return Valuation(goodput, latency, binding, s_in, costs, pools, node_cap, ov, link_capacity=link_cap)


def plan_queue(problem: "Problem", plan: "Plan") -> BulkQueue:
    """The queue in front of `plan` (queueing.py): its first pool, fed at the admitted rate, with the
    work and the deepest row's path of an entry batch of n = 1..B rows; later pools' splits on
    the path at two batches each."""
    ov, B = problem.overheads, plan.batch
    group_of = _group_of(plan)
    by_name = {d.name: d for d in problem.devices}
    s_in = [problem.survival_before(first) for first, _ in plan.splits]
    moved = [moved_in(plan, i) for i in range(len(plan.splits))]
    later = [i for i in range(len(plan.splits)) if group_of[i] != 0]
    costs = split_costs(problem, plan)
    later_s = 2.0 * sum(costs[i].worst_s for i in later)
    work, path = [], []
    node = pool_node_share(problem, plan.groups[0].device, plan.groups[0].replicas)
    for n in range(1, B + 1):
        w, p = n * node, 0.0
        for i in plan.groups[0].splits:
            first, last = plan.splits[i]
            dev = by_name[plan.groups[0].device]
            expect = n * s_in[i]                                  # survivors of this batch that reach split i
            rows = float(n) if i == 0 else min(float(B), max(1.0, expect))
            c = split_cost(problem, dev.profile, first, last, rows, moved[i], dev.link)
            w += (1.0 if i == 0 else min(1.0, expect)) * c.work_s
            p += c.worst_s
        work.append(w)
        path.append(p + later_s)
    return BulkQueue(B, plan.groups[0].replicas, tuple(work), tuple(path))


def goodput_within_slo(problem: "Problem", plan: "Plan") -> float:
    """The plan's goodput: with the queue, the rate at which slo_quantile of answers meet the SLO (0 if
    none); without it, 0 when the latency of its own batches breaks the SLO budget (slo - slack)."""
    v = value(problem, plan)
    if v.queue_rate is not None:
        return v.goodput
    return v.goodput if v.latency_s <= problem.slo_s - problem.slack_s + 1e-9 else 0.0


def node_batches_per_request(problem: "Problem", plan: "Plan") -> float:
    """Batches the node's loop handles per admitted request under `plan`: per split, the share of
    requests that enter it over its rows per batch. The first split's batch holds the entry rows
    measured at the heaviest load (`node_entry_rows`, at most B; full batches when unmeasured);
    a later split's, the survivors of one such batch."""
    ov, B = problem.overheads, float(plan.batch)
    entry = B if ov.node_entry_rows <= 0 else min(B, max(1.0, ov.node_entry_rows))
    total = 0.0
    for first, _ in plan.splits:
        s = problem.survival_before(first)
        if s > SURVIVAL_FLOOR:
            total += s / min(B, max(1.0, entry * s))
    return total


def node_wall_per_request(problem: "Problem", plan: "Plan | None" = None) -> float:
    """Wall seconds of the node's loop per request: its CPU per request, plus per batch times the
    plan's batches per request (none without a plan: a lower bound for any plan), at its core share."""
    ov = problem.overheads
    batches = 0.0 if plan is None or ov.node_s_per_batch <= 0 else node_batches_per_request(problem, plan)
    return (ov.node_s_per_request + ov.node_s_per_batch * batches) / ov.node_core_share


def node_capacity(problem: "Problem", plan: "Plan | None" = None) -> float:
    """Requests/s the node's event loop carries at the problem's utilisation under `plan` (without
    one, an upper bound over plans); inf when not counted."""
    c = node_wall_per_request(problem, plan)
    return problem.utilisation / c if c > 0 else math.inf


def _pool_binding(plan: "Plan", pool: PoolValue) -> str:
    first, last = plan.splits[pool.splits[0]][0], plan.splits[pool.splits[-1]][1]
    return f"throughput of blocks {first}-{last} on {pool.replicas} x {pool.device}"
