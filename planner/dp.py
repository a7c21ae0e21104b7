"""The planner's dynamic program: max-stage pipelined plans for early-exit models.

The model of a plan (DESIGN.md section 4, with the changes argued below)
------------------------------------------------------------------------
Nodes 0..P: node 0 is the input, node n >= 1 the point after the n-th split
end (a ramp block, or the last block for n = P). A split (i, j) runs the
blocks between nodes i and j and ends with ramp j-1, or with the head when
j = P. Ramps strictly inside a split are off, except on the sampled
fraction f of batches that evaluate them so that they stay measured.

At batch size B on device type c the split takes

    t = sum of block times + exit (ramp or head) + transfer in + [inner ramps]

where the transfer (the boundary state of B rows, from the type's profile)
is paid when the split's input comes from another device, and the inner
ramps are paid by the f sampled batches (f times in the work, fully in the
worst-case latency when f > 0). Of the admitted requests a fraction s_i
enters split (i, j) (s_0 = 1; s_i = survival past ramp i-1 with every ramp
on, so an input that would have left at a disabled ramp is taken to leave at
the next enabled one). Per admitted request the split costs the device
s_i * t / B seconds of work.

A device type on another host than the admitting node (`DeviceType.link`)
is reached over that host's link, hub and spoke: every batch it runs sends
its input rows there and brings back the answers and the survivors' rows,
so its split's latency (not its work: the link's reader and writer run
beside the worker) gains link(in bytes) + link(survivor bytes). The term
depends on the split alone, so the DP stays exact with it; a boundary
between two remote hosts pays both hosts' links, as the runtime's links
carry it through the admitting node.

Pools, not dedicated stages. Every device type used gets ONE pool of m
devices that runs a contiguous run of splits, each device taking whichever
of the pool's splits has a full batch (the runtime's shared workers). The
pool keeps up with rate lam while lam * R / (u * m) <= 1, where R is the sum
of its splits' work. Why pools instead of the design's dedicated replicas:
for any partition of m devices of one type among its splits,
min_g m_g / R_g <= sum m_g / sum R_g (the mediant), so a pool is never
slower than dedicated stages, at the same latency; the one-device case
(all splits on one device in turn) is the pool with m = 1. Within a pool
of one device a boundary moves nothing (same device: no transfer); within a
larger pool the next batch may run on another device, so it pays the
transfer. A type's pool is therefore used either whole (m = n_c: more
devices only raise capacity once transfers are paid) or as one device.
Restriction (documented, checked by the brute force in the tests): a type's
splits are contiguous, so a plan is a sequence of at most T pools, one per
type (A-B-A orders, where one type would need two pools, are not planned),
and a split runs on one type (no split is spread over two types' devices).
This turns the design's state "devices used per type" into "types used",
2^T states per node instead of prod(n_c + 1).

Throughput and latency. The plan's goodput is the bottleneck (max-stage)
min over pools of u * m / R. Its worst-case latency at rate lam is
sum of t (compute) + B / lam (filling the first batch) + sum over later
splits of B / (lam * s_i) (gathering B survivors), and must stay within
SLO - slack. In goodput mode the latency is taken at the plan's own
goodput; in cost mode at the target rate.

Solving (exact for this model)
------------------------------
For one batch size B and a wait rate rho (the rate at which the batch-fill
waits are charged), the latency of a plan is additive over splits. A run of
splits on one type then has a Pareto front of (work R, latency L) over its
internal cuts; the fronts of all runs (i, j) come from one sweep over the
end node j with a segmented Pareto filter (numpy). A second DP over
(node, set of types used) combines runs, keeping per state the Pareto front
of (score, L) where score is the bottleneck load max R / (u m) (goodput) or
the summed price of the devices the rate needs (cost). Both filters are
exact: every later step is monotone in both coordinates.

Max goodput needs the waits charged at the plan's own goodput, which is
what it maximises. Fixed-point iteration: rho_0 = a cheap upper bound (every
pool busy only with its inputs' blocks); rho_{k+1} = R(rho_k), the best
goodput with waits charged at rho_k. For any rho >= OPT the optimal plan
stays eligible, so R(rho) >= OPT; hence a round whose plan meets the SLO at
its own goodput R(rho) has found OPT, and otherwise rho falls through the
finitely many plan capacities (observed: 1-3 rounds). A search over lam with
waits charged at lam, as in the first version, is not monotone: each plan is
feasible only on a window [B * waits / (D - compute), capacity], which a
scan or bisection can step over.

Pruning, all of it exact: labels whose latency plus the least latency still
to come exceeds the budget; labels that cannot beat the best plan so far
(the cut), which is first the best stock plan, then the optimum of the same
problem with only every k-th ramp (cheap, and within a few per cent), then
the best batch size solved; batch sizes run best-first by their bound and
stop when no bound beats the best plan.

Min cost at rate r: one pass with waits at r and each pool given the fewest
devices that carry r (ceil(r * R / u)). Max goodput under a price budget:
at fixed rho, bisection on lam over the min-cost pass (monotone in lam; to
a relative 1e-10), inside the same fixed-point iteration on rho.

This module is the DP and its searches at one batch size (`BatchSearch`);
solve.py searches over batch sizes and values the candidates with the queue,
baselines.py makes the fixed-split plans every solve is checked against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .cost_model import SURVIVAL_FLOOR, entry_rows, node_share_per_device, split_cost, split_costs, value
from .plan import Group, Plan
from .problem import Problem

EPS = 1e-9
MAX_ROUNDS = 200       # fixed-point rounds per batch size (observed: 2-6)


# --------------------------------------------------------------------------
# Stage times of every split at one batch size
# --------------------------------------------------------------------------

class _Batch:
    """Work and latency of every split (i, j) on every device type at batch size b, under the
    cost model (cost_model.py): each split at the rows it sees, plus the per-batch cost."""

    def __init__(self, problem: Problem, b: int):
        p = self.p = problem
        self.b = b
        ov = p.overheads
        ends = list(p.ramp_blocks) + [p.num_blocks - 1]
        self.P = len(ends)
        self.nodes = np.array([-1] + ends)
        surv = [1.0] + [float(s) for s in p.survival]            # s_i for nodes 0..P-1
        self.s_in = np.array(surv + [0.0])
        # rows per batch of a split starting at node i (node P starts nothing)
        self.rows = np.array([entry_rows(ov, b, s, i == 0) for i, s in enumerate(surv)] + [float(b)])
        if ov.work_conserving:       # batches leave when a worker is free: no waits to fill them
            self.wait = np.zeros(self.P + 1)
        else:
            self.wait = np.array([1.0] + [1.0 / max(s, SURVIVAL_FLOOR) for s in surv[1:]] + [0.0])
        # a run's first split takes full batches (split 0, or a pool backlogged behind another pool:
        # cost_model.split_costs); a run's later splits, the survivors of one of its batches
        self.first_rows = np.full(self.P + 1, float(b))
        self.types = [i for i, d in enumerate(p.devices) if d.count > 0]
        self._upper = None
        self.work, self.lat, self.xfer = {}, {}, {}
        self.first_work, self.first_lat, self.first_xfer = {}, {}, {}
        for c in self.types:
            d = p.devices[c]
            self.work[c], self.lat[c], self.xfer[c] = self._matrices(d.profile, self.rows, d.link)
            self.first_work[c], self.first_lat[c], self.first_xfer[c] = (
                self._matrices(d.profile, self.first_rows, d.link) if ov.work_conserving
                else (self.work[c], self.lat[c], self.xfer[c]))

    def _matrices(self, prof, rows_at, link):
        """[i, j] matrices of seconds per batch (work, worst-case latency with the link's time) and the
        transfer into node i, a split from node i running rows_at[i] rows."""
        p, P, R = self.p, self.P, len(self.p.ramp_blocks)
        ov, f = p.overheads, p.sample_fraction
        blocks = np.empty((P + 1, P + 1))
        exits = np.empty((P + 1, P + 1))
        inner = np.empty((P + 1, P + 1))
        for i, rows in enumerate(rows_at):      # row i: splits starting at node i, at its rows
            at = np.concatenate([[0.0], np.cumsum(prof.blocks_at(rows))])[self.nodes + 1]
            blocks[i] = at - at[i]
            ramps = [prof.ramp(k, rows) for k in range(R)]
            exits[i] = np.array([0.0] + ramps + [prof.head(rows)])        # exit at node j
            rc = np.cumsum([0.0] + ramps + [0.0])                         # rc[n]: ramps at nodes 1..n
            inner[i] = np.concatenate([[0.0], np.maximum(rc[:-1] - rc[i], 0.0)])   # nodes i+1..j-1
        k = ov.compute_scale
        blocks, exits, inner = k * blocks, k * exits, k * inner
        work = blocks + exits + f * inner + ov.batch_fixed_s
        lat = blocks + exits + (inner if f > 0 else 0.0) + ov.batch_fixed_s
        valid = np.triu(np.ones((P + 1, P + 1), dtype=bool), 1)
        work, lat = np.where(valid, work, np.inf), np.where(valid, lat, np.inf)
        xfer = np.array([0.0] + [prof.transfer(p.boundary_bytes[self.nodes[n]] * rows_at[n])
                                 for n in range(1, P)] + [0.0])
        if link is not None:
            lat = lat + self._link_matrix(link, rows_at)
        return work, lat, xfer

    def _link_matrix(self, link, rows_at) -> np.ndarray:
        """[i, j]: seconds a batch of split (i, j) spends on a device's link to another host, as
        cost_model.link_cost prices it: its input rows there, the survivors' rows back."""
        p, P = self.p, self.P
        state = np.array([p.input_bytes] + [p.boundary_bytes[self.nodes[n]] for n in range(1, P + 1)], dtype=float)
        s_in = self.s_in
        onward = np.divide(s_in[None, :], s_in[:, None], out=np.zeros((P + 1, P + 1)), where=s_in[:, None] > 0)
        back = state[None, :] * rows_at[:, None] * onward
        back[:, P] = 0.0                                  # after the last block only answers go back
        return link.transfer(state * rows_at)[:, None] + link.transfer(back)

    def min_suffix_latency(self, rho: float) -> np.ndarray:
        """A lower bound on the latency from node j to the end, over any plan."""
        P, wb = self.P, self.b / rho
        best = np.full(P + 1, np.inf)
        best[P] = 0.0
        lat = np.minimum.reduce([m[c] for c in self.types for m in (self.lat, self.first_lat)])
        for j in range(P - 1, -1, -1):
            best[j] = np.min(lat[j, j + 1:] + best[j + 1:]) + self.wait[j] * wb
        return best

    def upper_goodput(self) -> float:
        """No plan beats every pool working only on its inputs' blocks (no ramp, transfer or wait)."""
        if self._upper is None:
            self._upper = self._upper_goodput()
        return self._upper

    def _upper_goodput(self) -> float:
        p, u = self.p, self.p.utilisation
        s_before = np.ones(p.num_blocks)
        for k, r in enumerate(p.ramp_blocks):
            s_before[r + 1:] = p.survival[k]
        # every split runs at one of self.rows; the cheapest per row of those bounds any of them
        k = p.overheads.compute_scale
        per_row = lambda prof: k * np.minimum.reduce([prof.blocks_at(r) / r for r in set(self.rows.tolist())])
        per_block = [s_before * per_row(p.devices[c].profile) / (u * p.devices[c].count) for c in self.types]
        total = float(np.minimum.reduce(per_block).sum())
        return len(self.types) / total if total > 0 else math.inf


# --------------------------------------------------------------------------
# One sweep over the nodes: run fronts and the DP over (node, types used)
# --------------------------------------------------------------------------

def _segmented_pareto(group: np.ndarray, x: np.ndarray, y: np.ndarray, y_span: float) -> np.ndarray:
    """Indices (sorted by group, x) of labels that no earlier label of their group beats in both x and y.

    One float sort key (group, then x) instead of a lexsort: labels tied on x may then keep a
    dominated twin, which costs a row, never a plan. x >= 0; 0 <= y < y_span.
    """
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    hi = float(x.max()) if len(x) > 1 else 0.0
    order = np.argsort(group * (hi * 2 + 1.0) + x, kind="stable")
    g, yy = group[order], y[order]
    new_group = np.empty(len(g), dtype=bool)
    new_group[0] = True
    np.not_equal(g[1:], g[:-1], out=new_group[1:])
    # The best y seen before each label within its group (sorted by x): keep only improvements.
    # Offsetting each group below all earlier ones makes one global running minimum restart per group.
    shift = np.cumsum(new_group) * y_span
    run = np.minimum.accumulate(yy - shift) + shift
    keep = new_group.copy()
    keep[1:] |= yy[1:] < run[:-1] * (1 - 1e-12) - 1e-15
    return order[keep]


def _share(s_in: np.ndarray, work: np.ndarray) -> np.ndarray:
    """s_in * work, where an impossible run (inf work) stays impossible even when no input
    survives to it (survival exactly 0, as live forecasts give): 0 * inf would be NaN."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(work), np.inf, s_in * work)


class _Grow:
    """Columns that grow by appending (amortised doubling)."""

    def __init__(self, **dtypes):
        self.n, self._cap = 0, 64
        self.cols = {k: np.empty(self._cap, dtype=t) for k, t in dtypes.items()}

    def add(self, **values) -> tuple[int, int]:
        m = len(next(iter(values.values())))
        if self.n + m > self._cap:
            self._cap = max(2 * self._cap, self.n + m)
            self.cols = {k: np.resize(v, self._cap) for k, v in self.cols.items()}
        for k, v in values.items():
            self.cols[k][self.n:self.n + m] = v
        lo, self.n = self.n, self.n + m
        return lo, self.n

    def __getitem__(self, key: str) -> np.ndarray:
        return self.cols[key][:self.n]


class _Runs:
    """Runs of splits on every kind of device (a type's single device, or its pool), all kinds in
    the same arrays: their Pareto fronts of (work R, latency L), grown end by end from the starts
    the DP has reached, and the DP's labels at those starts that may still add each kind's type."""

    def __init__(self, bt: _Batch, kinds: list[tuple[int, bool]], rho: float, work_cap: np.ndarray,
                 latency_cap: np.ndarray):
        P, b = bt.P, bt.b
        self.P, self.kinds, self.work_cap = P, kinds, work_cap
        self.c = np.array([c for c, _ in kinds], dtype=np.int64)
        self.pool = np.array([pool for _, pool in kinds], dtype=bool)
        self.count = np.array([bt.p.devices[c].count for c, _ in kinds], dtype=np.int64)
        self.price = np.array([bt.p.devices[c].price_per_hour for c, _ in kinds], dtype=float)
        s_in = np.concatenate([bt.s_in[:-1], [1.0]])[:, None]   # node P starts nothing (its row is all inf)
        wait = bt.wait[:, None] * (0.0 if math.isinf(rho) else b / rho)
        rows, first_rows = bt.rows[:, None], bt.first_rows[:, None]
        fR, fL, nR, nL = [], [], [], []
        for c, pool in kinds:
            work, lat, xfer = bt.work[c], bt.lat[c], bt.xfer[c]
            f_work, f_lat, f_xfer = bt.first_work[c], bt.first_lat[c], bt.first_xfer[c]
            # a run from another device pays its input's move; inside a pool the next device may differ
            ent_x = np.where(np.arange(P + 1) > 0, f_xfer, 0.0)[:, None]
            in_x = (xfer if pool else np.zeros_like(xfer))[:, None]
            fR.append(_share(s_in, f_work + ent_x) / first_rows)
            fL.append(f_lat + ent_x + wait)
            nR.append(_share(s_in, work + in_x) / rows)
            nL.append(lat + in_x + wait)
        self.first_R, self.first_L = np.stack(fR), np.stack(fL)       # [q, i, j]: run of one split
        self.next_R, self.next_L = np.stack(nR), np.stack(nL)         # [q, k, j]: one more split
        # the least latency (with what must follow) and work that one more split from node k adds,
        # and the least latency of a run from i ending at j or later (with what must follow)
        self.ext_L = np.min(self.next_L + latency_cap[None, None, :], axis=2)
        self.ext_R = np.min(self.next_R, axis=2)
        self.start_L = np.minimum.accumulate((self.first_L + latency_cap)[:, :, ::-1], axis=2)[:, :, ::-1]
        self.labels = _Grow(q=np.int64, start=np.int64, end=np.int64, R=float, L=float, prev=np.int64)
        self.alive = np.zeros(0, dtype=np.int64)        # labels that one more split may still extend
        self.starts_q = np.zeros(0, dtype=np.int64)     # active (kind, start node) pairs
        self.starts_i = np.zeros(0, dtype=np.int64)
        self.base_L = np.full((len(kinds), P + 1), np.inf)   # least latency of the DP's labels at a start
        # the DP's labels at each (kind, start) that lack the kind's type, concatenated
        self.free = _Grow(score=float, L=float, S=np.int64, row=np.int64)
        self.offset = np.zeros((len(kinds), P + 1), dtype=np.int64)
        self.count_at = np.zeros((len(kinds), P + 1), dtype=np.int64)

    def activate(self, i: int, score, L, S, bits: np.ndarray) -> None:
        """Node i's labels (final now) become starts for every kind whose type some label lacks."""
        lacks = (S[:, None] & bits[None, :]) == 0               # [label, kind]
        for q in np.flatnonzero(lacks.any(axis=0)):
            rows = np.flatnonzero(lacks[:, q])
            lo, hi = self.free.add(score=score[rows], L=L[rows], S=S[rows], row=rows)
            self.offset[q, i], self.count_at[q, i] = lo, hi - lo
            self.base_L[q, i] = float(np.min(L[rows]))
            self.starts_q = np.append(self.starts_q, q)
            self.starts_i = np.append(self.starts_i, i)

    def exhausted(self) -> bool:
        return len(self.starts_q) == 0 and len(self.alive) == 0

    def extend(self, j: int, latency_cap: np.ndarray, D: float) -> tuple[int, int]:
        """Add the Pareto-optimal runs (of every kind) ending at node j; returns their label rows.

        Every bound counts the least latency of the DP's labels at the run's start, so runs no
        prefix could afford are never built, and starts and labels that cannot lead anywhere retire
        (a run's latency and work only grow with its end)."""
        lab = self.labels
        sq, si = self.starts_q, self.starts_i
        if len(sq):
            live = (self.base_L[sq, si] + self.start_L[sq, si, j] <= D + EPS) & \
                (self.first_R[sq, si, j] <= self.work_cap[sq])
            sq, si = self.starts_q, self.starts_i = sq[live], si[live]
        a = self.alive
        qa, k = lab.cols["q"][a], lab.cols["end"][a]
        q = np.concatenate([sq, qa])
        st = np.concatenate([si, lab.cols["start"][a]])
        R = np.concatenate([self.first_R[sq, si, j], lab.cols["R"][a] + self.next_R[qa, k, j]])
        L = np.concatenate([self.first_L[sq, si, j], lab.cols["L"][a] + self.next_L[qa, k, j]])
        prev = np.concatenate([np.full(len(sq), -1, np.int64), a])
        ok = np.flatnonzero((L + self.base_L[q, st] + latency_cap[j] <= D + EPS) & (R <= self.work_cap[q]))
        keep = ok[_segmented_pareto(q[ok] * (self.P + 1) + st[ok], R[ok], L[ok], D + 1.0)]
        q, st, R, L = q[keep], st[keep], R[keep], L[keep]
        lo, hi = lab.add(q=q, start=st, end=np.full(len(keep), j, np.int64), R=R, L=L, prev=prev[keep])
        if j < self.P:     # node P ends the model
            grow = (L + self.base_L[q, st] + self.ext_L[q, j] <= D + EPS) & (R + self.ext_R[q, j] <= self.work_cap[q])
            self.alive = np.concatenate([a, np.arange(lo, hi)[grow]])
        return lo, hi

    def kind(self, gid: int) -> "_RunKind":
        return _RunKind(int(self.c[self.labels["q"][gid]]), self)

    def splits(self, gid: int) -> list[int]:
        """Node ends of the splits of run label gid, in order."""
        out = []
        while gid >= 0:
            out.append(int(self.labels["end"][gid]))
            gid = int(self.labels["prev"][gid])
        return out[::-1]


@dataclass
class _RunKind:
    c: int
    runs: _Runs

    def splits(self, gid: int) -> list[int]:
        return self.runs.splits(gid)


@dataclass
class _Label:
    score: float
    latency: float
    runs: list            # [(run kind, start node, run label, devices)]


class _Scorer:
    """How a run adds to a plan's score, and how many devices it takes."""

    def __init__(self, bt: _Batch, mode: str, lam: float | None):
        self.bt, self.mode, self.lam = bt, mode, lam
        self.u = bt.p.utilisation
        # per device type: the node's CPU per request one of its devices gives up (cost_model.py)
        self.node_share = np.array([node_share_per_device(bt.p, d) for d in bt.p.devices])

    def term(self, runs: _Runs, q: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the run's own score term, devices) per run label; inf where it does not fit. A pool of m
        devices carries its work plus m times its devices' share of the node's CPU per request."""
        n, pool, share = runs.count[q], runs.pool[q], self.node_share[runs.c[q]]
        if self.mode == "goodput":
            m = np.where(pool, n, 1)
            return R / (self.u * m) + share / self.u, m
        # lam * (R + m * share) <= u * m  <=>  m >= lam * R / (u - lam * share)
        room = self.u - self.lam * share
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.where(room > 0, np.ceil(self.lam * R / np.where(room > 0, room, 1.0) - 1e-9), np.inf)
        need = np.minimum(np.maximum(1, need), n + 1).astype(np.int64)
        m = np.where(pool, need, np.where(need <= 1, 1, n + 1))      # one device or not at all
        return np.where(m > n, np.inf, runs.price[q] * m), m

    def combine(self, score: np.ndarray, term: np.ndarray) -> np.ndarray:
        return np.maximum(score, term) if self.mode == "goodput" else score + term


def _sweep(bt: _Batch, runs: _Runs, scorer: _Scorer, latency_cap: np.ndarray, score_cut: float
           ) -> _Label | None:
    """The best plan (lowest score, then latency) of runs of distinct types covering nodes 0..P.

    One pass over the nodes j. At j, the fronts of every kind grow by the runs ending at j, and each
    new run is joined to the DP's labels at its start; V[j], the Pareto-optimal (score, latency)
    labels per set S of types used (flat arrays with an S column), is then final, and j becomes a
    start for the kinds some label of V[j] lacks. Fronts thus only grow from starts the DP reached."""
    P, D = bt.P, label_budget(bt.p)
    type_bit = {c: 1 << n for n, c in enumerate(bt.types)}
    bits = np.array([type_bit[c] for c in runs.c], dtype=np.int64)
    one_type = len(bt.types) == 1          # then a run is the whole plan: only runs ending at P count
    V: list[tuple | None] = [None] * (P + 1)
    V[0] = (np.zeros(1), np.zeros(1), np.zeros(1, dtype=np.int64), np.full((1, 5), -1, dtype=np.int64))
    for j in range(P + 1):
        if j > 0:
            if runs.exhausted():
                break
            rows = runs.extend(j, latency_cap, D)
            if one_type and j < P:
                continue
            joined = _join(runs, rows, scorer, latency_cap[j], D, score_cut, bits)
            if joined is None:
                continue
            score, L, S, back = joined
            keep = _segmented_pareto(S, score, L, D + 1.0)
            V[j] = score[keep], L[keep], S[keep], back[keep]
        if j < P:
            runs.activate(j, V[j][0], V[j][1], V[j][2], bits)
    if V[P] is None:
        return None
    score, L, _, back = V[P]
    idx = int(np.lexsort((L, score))[0])
    best = (float(score[idx]), float(L[idx]))
    out, node = [], P
    while node > 0:
        prev_node, prev_row, _, gid, m = (int(v) for v in V[node][3][idx])
        out.append((runs.kind(gid), prev_node, gid, m))
        node, idx = prev_node, prev_row
    return _Label(best[0], best[1], out[::-1])


def _join(runs: _Runs, rows: tuple[int, int], scorer: _Scorer, cap_after: float, D: float,
          score_cut: float, bits: np.ndarray):
    """New run labels (rows) joined to every DP label at their start that lacks the run's type."""
    lo, hi = rows
    if hi == lo:
        return None
    lab = runs.labels
    q, st, R, L = lab["q"][lo:hi], lab["start"][lo:hi], lab["R"][lo:hi], lab["L"][lo:hi]
    term, m = scorer.term(runs, q, R)
    cnt = runs.count_at[q, st]
    label = np.repeat(np.arange(hi - lo), cnt)
    within = np.arange(len(label)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    f = runs.offset[q, st][label] + within
    free = runs.free
    new_score = scorer.combine(free["score"][f], term[label])
    new_L = free["L"][f] + L[label]
    ok = np.flatnonzero(np.isfinite(new_score) & (new_score <= score_cut) & (new_L + cap_after <= D + EPS))
    if len(ok) == 0:
        return None
    label, f = label[ok], f[ok]
    back = np.stack([st[label], free["row"][f], q[label], lo + label, m[label]], axis=1)
    return new_score[ok], new_L[ok], free["S"][f] | bits[q[label]], back


# --------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------

def _plan_from(bt: _Batch, label: _Label) -> Plan:
    p = bt.p
    splits, groups = [], []
    for kind, start, gid, m in label.runs:
        idx, first_node = [], start
        for end in kind.splits(gid):
            splits.append([int(bt.nodes[first_node]) + 1, int(bt.nodes[end])])
            idx.append(len(splits) - 1)
            first_node = end
        groups.append(Group(p.devices[kind.c].name, int(m), idx))
    enabled = [p.ramp_blocks.index(s[1]) for s in splits[:-1]]
    return Plan(bt.b, splits, groups, enabled, 0.0, 0.0, 0.0, [0.0] * len(splits))


def label_budget(problem: Problem) -> float:
    """The latency the DP's labels may add up to: the SLO less its slack and the node's own time
    per request (which every plan pays once; cost_model.value adds it back)."""
    return problem.slo_s - problem.slack_s - problem.overheads.node_wall_s


def split_work(problem: Problem, prof, first: int, last: int, b: float) -> float:
    """Seconds of device work for one batch of b rows of split first..last (no transfer)."""
    return split_cost(problem, prof, first, last, b, False).work_s


def stage_times(problem: Problem, plan: Plan, rows: list[float] | None = None) -> list[tuple[float, float]]:
    """(work, worst-case latency) seconds per batch of each split of `plan` on its device, at the
    rows the cost model expects or at `rows` per split."""
    return [(c.work_s, c.worst_s) for c in split_costs(problem, plan, rows)]


def evaluate(problem: Problem, plan: Plan, rate: float | None = None,
             queue: bool = True) -> tuple[float, float, str]:
    """(goodput, latency, binding) of `plan` under the cost model (cost_model.value): with
    `queue=False` the model the DP optimises exactly, with the queue what a plan is chosen by."""
    v = value(problem, plan, rate, queue=queue)
    return v.goodput, v.latency_s, v.binding


def finish_plan(problem: Problem, plan: Plan, rate: float | None = None, queue: bool = False) -> Plan:
    plan.goodput, plan.latency_s, bottleneck = evaluate(problem, plan, rate, queue)
    plan.stage_s = [t[0] for t in stage_times(problem, plan)]
    price = {d.name: d.price_per_hour for d in problem.devices}
    plan.cost_per_hour = sum(price[g.device] * g.replicas for g in plan.groups)
    budget = problem.slo_s - problem.slack_s
    plan.binding = bottleneck
    if plan.latency_s >= budget * 0.995:
        plan.binding += f"; latency at the SLO budget ({plan.latency_s * 1000:.1f} of {budget * 1000:.1f} ms)"
    return plan


# --------------------------------------------------------------------------
# Searches
# --------------------------------------------------------------------------

class BatchSearch:
    """The searches of one batch size."""

    def __init__(self, problem: Problem, b: int):
        self.p, self.bt = problem, _Batch(problem, b)
        self.rounds = 0

    def _pass(self, rho: float, mode: str, lam: float | None, score_cut: float) -> _Label | None:
        bt, u = self.bt, self.p.utilisation
        latency_cap = bt.min_suffix_latency(rho)
        if latency_cap[0] > label_budget(self.p) + EPS:
            return None                  # even the fastest devices, unloaded, miss the SLO at this batch size
        if mode == "goodput":
            # A run whose work alone overloads its pool past the cut can never be part of a better plan.
            work_cap = lambda c, pool: score_cut * u * (self.p.devices[c].count if pool else 1) * (1 + 1e-9)
        else:
            work_cap = lambda c, pool: u * (self.p.devices[c].count if pool else 1) / lam * (1 + 1e-9)
        kinds = [(c, pool) for c in bt.types
                 for pool in ((False,) if self.p.devices[c].count == 1 else (False, True))]
        runs = _Runs(bt, kinds, rho, np.array([work_cap(c, pool) for c, pool in kinds]), latency_cap)
        return _sweep(bt, runs, _Scorer(bt, mode, lam), latency_cap, score_cut)

    def start_goodput(self) -> None:
        # Any rho >= OPT works as a start; the cheap bound charges waits from the first round on.
        self.rho, self.done, self.plan = self.bt.upper_goodput(), False, None

    def goodput_round(self, beat: float) -> None:
        """One fixed-point round: afterwards `rho` bounds this batch size's best goodput from above,
        and `done` says whether `plan` (or None: nothing beats `beat`) is final."""
        self.rounds += 1
        cut = (1.0 / beat if beat > 0 else math.inf) * (1 + 1e-9)
        label = self._pass(self.rho, "goodput", None, cut)
        if label is None:
            self.done, self.plan = True, None
            return
        cap = 1.0 / max(label.score, 1e-300)
        plan = finish_plan(self.p, _plan_from(self.bt, label))
        # cap = R(rho) >= OPT; a plan that also meets the SLO at its own cap proves cap = OPT.
        if plan.latency_s <= self.p.slo_s - self.p.slack_s + EPS or cap >= self.rho * (1 - 1e-12):
            self.done, self.plan = True, plan
        self.rho = min(self.rho, cap)

    def max_goodput(self, beat: float) -> tuple[Plan | None, bool]:
        """The plan of most goodput above `beat` (None if none beats it), and whether the search converged."""
        self.start_goodput()
        for _ in range(MAX_ROUNDS):
            self.goodput_round(beat)
            if self.done:
                return self.plan, True
        return None, False

    def min_cost(self, rate: float, cut: float = math.inf) -> Plan | None:
        self.rounds += 1
        label = self._pass(rate, "cost", rate, cut)
        return None if label is None else finish_plan(self.p, _plan_from(self.bt, label), rate)

    def max_goodput_within_budget(self, ceiling: float) -> tuple[Plan | None, bool]:
        """Most goodput with devices costing at most the budget; `ceiling` bounds it from above."""
        budget = self.p.budget_per_hour
        rho, best = ceiling, None
        for _ in range(MAX_ROUNDS):
            found = self._bisect_rate(rho, budget)
            if found is None:
                return best, True
            lam, label = found
            plan = finish_plan(self.p, _plan_from(self.bt, label))
            if plan.latency_s <= self.p.slo_s - self.p.slack_s + EPS and (best is None or plan.goodput > best.goodput):
                best = plan
            if plan.goodput >= rho * (1 - 1e-9):
                return plan, True
            rho = plan.goodput
        return best, False

    def _bisect_rate(self, rho: float, budget: float):
        """Highest lam (waits charged at rho) whose cheapest plan fits the budget, with that plan."""
        self.rounds += 1
        lo, hi, found = 0.0, rho, None
        lam = rho
        for _ in range(60):
            label = self._pass(rho, "cost", lam, budget * (1 + 1e-12) + 1e-12)
            if label is not None:
                found, lo = (lam, label), lam
                if lam == hi:
                    break
            else:
                hi = lam
            if found is not None and hi - lo <= hi * 1e-10:
                break
            lam = (lo + hi) / 2 if found is not None or lo > 0 else hi / 2
            if found is None and lam < rho * 1e-9:
                break
        return found
