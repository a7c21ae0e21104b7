"""The queue in front of a plan: how late its answers are at a given rate, not only how many it can carry.

A plan's capacity (cost_model.py) says at what rate its devices are busy all
the time; what a user sees first is the latency of the slowest 1% of
answers, and at small batch sizes that goes past the SLO far below capacity
(batch 1 behaves as an M/D/1 queue: its 99th percentile wait passes three
service times at 60% load). This module computes the share of requests that
miss a deadline at a rate, for the runtime's dispatch.

The model: one pool of `servers` devices fed by Poisson arrivals. The
runtime's admission batcher is work-conserving: a free device takes every
waiting request up to the batch size B, so a batch of n rows starts as soon
as a device is free and holds min(waiting, B) rows (one, when it arrives to
an idle device). A batch of n entry rows costs the pool `work_s[n-1]`
seconds, everything its rows cause downstream included (the runtime runs
downstream splits first, so a batch's survivors finish before the next entry
batch); its deepest row is answered `path_s[n-1]` after the batch starts.
Several devices are taken as one device `servers` times as fast for the
queue, each batch's own path still at one device's speed.

Exact part: the number of requests left waiting when a batch ends is a
Markov chain (the embedded chain of a bulk-service M/G^B/1 queue), solved
directly, truncated where every request would miss anyway. Approximate part,
for a request arriving at a random time (PASTA): the device is busy with
the chain's utilisation; the batch in service is length-biased, the arrival
uniform within it; those ahead are the batch's leftovers plus the Poisson
arrivals since it started; the request then waits the rest of that batch
and one full batch per B ahead of it, and rides a batch of its position plus
the requests that arrive meanwhile. tests/planner/test_queueing.py checks
the result against the discrete-event simulator.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse, special
from scipy.sparse import linalg as sparse_linalg
from threadpoolctl import ThreadpoolController

_ELAPSED_POINTS = 12      # points per in-service batch at which an arrival is placed (midpoints)
_MIN_STATES = 200         # the chain's states at least (a small batch's queue runs long before it settles)
_MAX_STATES = 4000        # at most (past the deadline's reach every request misses anyway)
_SPARSE_FROM = 600        # states from which the balance equations are solved sparse (below it dense wins)
_PMF_FLOOR = 1e-18        # Poisson probabilities below this are left out of a sparse chain (it agrees to 1e-12)
_RATE_STEPS = 40          # root-finding steps on the rate, at most (it stops at a relative 1e-4)


@dataclass(frozen=True)
class BulkQueue:
    """One pool under work-conserving batching: its batch size, devices and per-batch times by rows."""

    batch: int
    servers: int
    work_s: tuple[float, ...]     # [n-1]: pool seconds one entry batch of n rows costs (expected)
    path_s: tuple[float, ...]     # [n-1]: seconds from such a batch's start to its deepest row's answer

    def __post_init__(self):
        if self.batch < 1 or self.servers < 1 or len(self.work_s) != self.batch or len(self.path_s) != self.batch:
            raise ValueError(f"BulkQueue: batch {self.batch!r}, servers {self.servers!r} need {self.batch} "
                             f"work and path times, got {len(self.work_s)} and {len(self.path_s)}")
        if not all(math.isfinite(x) and x > 0 for x in self.work_s + self.path_s):
            raise ValueError("BulkQueue: batch times must be finite and positive")

    @property
    def serve_s(self) -> np.ndarray:
        """Seconds per batch as the queue sees them (the pool's devices as one)."""
        return np.asarray(self.work_s) / self.servers

    def stable_rate(self) -> float:
        """The rate past which the queue grows without end (every batch full)."""
        return self.batch / float(self.serve_s[-1])

    def miss_share(self, rate: float, deadline_s: float) -> float:
        """The share of requests arriving at `rate` whose answer comes later than `deadline_s`."""
        if rate <= 0:
            return float(self.path_s[0] > deadline_s)
        if rate >= self.stable_rate() * (1 - 1e-9):
            return 1.0
        return _Chain(self, rate, deadline_s).miss_share(deadline_s)

    def max_rate(self, deadline_s: float, miss: float) -> float:
        """The highest rate at which at most `miss` of the answers come after `deadline_s` (0 if none).

        The Illinois variant of regula falsi on log(miss share) - log(miss), which is monotone in
        the rate: a handful of chain solves instead of a bisection's dozens."""
        if self.miss_share(0.0, deadline_s) > miss:
            return 0.0
        f = lambda r: math.log(max(self.miss_share(r, deadline_s), 1e-12)) - math.log(miss)
        lo, hi = 0.0, self.stable_rate() * (1 - 1e-9)
        f_lo, f_hi = math.log(1e-12) - math.log(miss), f(hi)
        side = 0
        for _ in range(_RATE_STEPS):
            if hi - lo <= hi * 1e-4:
                break
            mid = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
            if not lo < mid < hi:
                mid = (lo + hi) / 2
            f_mid = f(mid)
            if f_mid <= 0:
                lo, f_lo = mid, f_mid
                if side == -1:
                    f_hi /= 2
                side = -1
            else:
                hi, f_hi = mid, f_mid
                if side == 1:
                    f_lo /= 2
                side = 1
        return lo

    def latency_quantile(self, rate: float, quantile: float, horizon_s: float) -> float:
        """The `quantile` of answer latency at `rate`, searched up to `horizon_s` (inf past it)."""
        miss = 1.0 - quantile
        if rate <= 0:
            return float(self.path_s[0])
        if rate >= self.stable_rate() * (1 - 1e-9):
            return math.inf
        chain = _Chain(self, rate, horizon_s)
        if chain.miss_share(horizon_s) > miss:
            return math.inf
        lo, hi = 0.0, horizon_s
        for _ in range(20):
            mid = (lo + hi) / 2
            if chain.miss_share(mid) <= miss:
                hi = mid
            else:
                lo = mid
        return hi


def _poisson_pmf(k: np.ndarray, mean: float) -> np.ndarray:
    """P(A = k) for A ~ Poisson(mean), k >= 0 (scipy.special directly: scipy.stats' per-call overhead
    was a fifth of a solve)."""
    if mean <= 0:
        return (k == 0).astype(float)
    return np.exp(k * math.log(mean) - mean - special.gammaln(k + 1))


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """One controller for the process: building one reads every loaded library (/proc/self/maps),
    which took a third of a solve when done per chain."""
    return ThreadpoolController()


class _Chain:
    """The embedded chain of one queue at one rate, and the deadline misses of a random arrival."""

    def __init__(self, q: BulkQueue, rate: float, reach_s: float):
        """The chain at `rate`, its states enough for deadlines up to `reach_s`."""
        self.q, self.rate = q, rate
        self.serve = q.serve_s
        self.path = np.asarray(q.path_s)
        B = q.batch
        # A request with this many ahead waits at least this many full batches: past it, all miss.
        full_batches = math.ceil(reach_s / self.serve[-1]) + 1
        self.N = int(min(_MAX_STATES, max(B * (full_batches + 3), _MIN_STATES)))
        self.pi = self._stationary()

    def _taken(self, waiting: np.ndarray) -> np.ndarray:
        """Rows a batch takes when `waiting` requests wait as a device frees (one after an idle spell)."""
        return np.clip(waiting, 1, self.q.batch)

    def _stationary(self) -> np.ndarray:
        """The chain's stationary distribution: pi (P - I) = 0 with sum(pi) = 1, solved as
        (P^T - I) pi = 0 with its last row replaced by ones. Large chains are sparse (a state moves
        at most a few Poisson spreads up), and a sparse LU of 2,000 states takes a quarter of the
        dense solve's time; small ones are solved dense, where the sparse set-up costs more."""
        A = self._balance_sparse() if self.N + 1 >= _SPARSE_FROM else self._balance_dense()
        b = np.zeros(self.N + 1)
        b[-1] = 1.0
        # One BLAS thread: a 200-state solve takes 0.5 ms on one, and 130 ms on two threads that
        # spin against anything else on a 2-core machine (measured here beside a busy process).
        with _blas().limit(limits=1, user_api="blas"):
            pi = sparse_linalg.spsolve(A, b) if sparse.issparse(A) else np.linalg.solve(A, b)
        pi = np.clip(pi, 0.0, None)
        return pi / pi.sum()

    def _moves(self):
        """Per batch size n, the states whose batch takes n rows, where they land and the Poisson
        probabilities of arrivals during it (the transition matrix's rows, its lumped last column
        aside: the balance equations drop that row for the normalisation)."""
        N, B = self.N, self.q.batch
        states = np.arange(N + 1)
        taken = self._taken(states)
        left = np.maximum(states - taken, 0)
        for n in range(1, B + 1):
            rows = np.nonzero(taken == n)[0]
            if len(rows):
                yield rows, left[rows], self.rate * self.serve[n - 1]

    def _balance_dense(self) -> np.ndarray:
        N = self.N
        k = np.arange(N + 1)
        A = -np.eye(N + 1)
        for rows, left, mean in self._moves():
            pmf = _poisson_pmf(k, mean)
            for r, lo in zip(rows, left):
                A[lo:N, r] += pmf[:N - lo]
        A[-1] = 1.0
        return A

    def _balance_sparse(self):
        N = self.N
        cols, lands, probs = [], [], []
        for rows, left, mean in self._moves():
            k = np.arange(min(N, int(mean + 12 * math.sqrt(mean) + 40)) + 1)
            pmf = _poisson_pmf(k, mean)
            k, pmf = k[pmf > _PMF_FLOOR], pmf[pmf > _PMF_FLOOR]
            land = left[:, None] + k[None, :]
            keep = land < N
            cols.append(np.broadcast_to(rows[:, None], land.shape)[keep])
            lands.append(land[keep])
            probs.append(np.broadcast_to(pmf[None, :], land.shape)[keep])
        top = np.arange(N)
        i = np.concatenate(lands + [top, np.full(N + 1, N)])
        j = np.concatenate(cols + [top, np.arange(N + 1)])
        v = np.concatenate(probs + [np.full(N, -1.0), np.ones(N + 1)])
        return sparse.csc_matrix((v, (i, j)), shape=(N + 1, N + 1))

    def miss_share(self, t: float) -> float:
        """The share of random arrivals answered later than `t`."""
        q, lam = self.q, self.rate
        B = q.batch
        states = np.arange(self.N + 1)
        taken = self._taken(states)
        left = np.maximum(states - taken, 0)
        T = self.serve[taken - 1]
        busy = min(1.0, lam * float(self.pi @ T) / float(self.pi @ taken))
        miss_idle = float(self.path[0] > t)
        # The batch in service, length-biased, and where in it the arrival lands.
        w = self.pi * T
        w = w / w.sum()
        u = (np.arange(_ELAPSED_POINTS) + 0.5) / _ELAPSED_POINTS
        elapsed = T[:, None] * u[None, :]                     # [state, point]
        residual = T[:, None] - elapsed
        limit = self._most_ahead(residual, t)                 # the most ahead with which it passes
        # ahead = leftovers + Poisson(lam * elapsed); it misses when ahead > limit
        extra = limit - left[:, None]
        p_miss = np.where(extra < 0, 1.0, special.pdtrc(np.maximum(extra, 0), lam * elapsed))
        miss_busy = float((w[:, None] * p_miss).sum() / _ELAPSED_POINTS)
        return (1 - busy) * miss_idle + busy * miss_busy

    def _most_ahead(self, residual: np.ndarray, t: float) -> np.ndarray:
        """Per residual time: the most requests ahead with which an arrival still meets `t` (-1: none)."""
        B, lam = self.q.batch, self.rate
        full, path_full = self.serve[-1], self.path[-1]
        # Behind k >= 1 full batches it rides a full one: passes while residual + k * full + path_full <= t.
        k1 = np.floor((t - residual - path_full) / full + 1e-12)
        best = np.where(k1 >= 1, (k1 + 1) * B - 1, -1).astype(np.int64)
        # In the very next batch: its position plus those arriving meanwhile ride with it.
        joins = np.floor(lam * residual)
        return np.where(best < 0, self._next_batch_most(residual, joins, t), best)

    def _next_batch_most(self, residual: np.ndarray, joins: np.ndarray, t: float) -> np.ndarray:
        """The largest position a < B whose batch (a + 1 + joins rows, at most B) is answered by `t`
        after `residual` (-1: none). Position B - 1 rides a full batch; below it, position a rides
        n = a + 1 + joins < B rows, so the answer is the most rows n < B whose path passes, less
        1 + joins, found by one search on the path's suffix minimum (it need not grow with n)."""
        B, path = self.q.batch, self.path
        allowed = t - residual
        suffix_min = np.minimum.accumulate(path[:B - 1][::-1])[::-1]
        most = np.searchsorted(suffix_min, allowed, side="right")   # most rows n < B that pass
        below = np.where(most >= 1 + joins, most - 1 - joins, -1)
        return np.where(path[B - 1] <= allowed, B - 1, below).astype(np.int64)
