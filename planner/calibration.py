"""The running node's measurements, turned into the cost model's overheads (cost_model.Overheads).

- Per-batch cost: a batch sent to an idle worker holds no queueing at the
  worker, so its round trip less the profile's compute at its rows is what a
  batch costs beyond the profile (the node's dispatch, the messages to and
  from the worker, gathering rows from slots, CPU shared with the node).
- The node's time per request: the node process's CPU seconds per interval,
  fitted over the last intervals as a fixed share plus a cost per request
  (HTTP, decoding, tokenizing, admission, answering) plus a cost per batch
  (dispatch, gathering and scattering rows, the worker's messages), then
  priced at the batches per request of the busiest interval (NodeCpuFit). A
  request alone in its batch pays the whole batch's cost, so one interval's
  ratio overstates what a request costs when the load rises. Until the
  intervals differ enough to tell the terms apart, the ratio of the interval.
- Compute scale: the workers' own compute seconds (timed in the worker, no
  messages) over the profile's compute at the rows each split ran. The
  profile is measured on an idle machine at start; serving, the node and
  anything else on the same cores slow every op (on 2 cores, MiniLM's batches
  took 1.4-1.7x their profile while a node served them).
- The share of a core the node's loop gets: its thread's run time over run
  time plus the time it waited, runnable, for a core (/proc schedstat). On 2
  cores beside a worker of 2 threads and a load client, a busy loop waits.
- Whether the node shares the workers' cores: when the workers' threads
  take every core, each second the node computes is a second a worker does not.

Every estimate is blended toward each interval's figure, never jumps to it: one
interval of a noisy 2-core machine must not swing the plan.
"""
from __future__ import annotations

import itertools
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

import dataclasses
import os

import numpy as np

from .cost_model import split_cost
from .problem import Problem


@dataclass(frozen=True)
class BatchTiming:
    """One batch that found its worker idle: its split's blocks, its rows, and its round trip."""

    first: int
    last: int
    rows: int
    round_trip_s: float


def per_batch_costs(problem: Problem, timings: Iterable[BatchTiming], device: int = 0) -> list[float]:
    """Round trip minus the profile's compute (per-batch cost excluded), per batch sent to an idle worker."""
    prof = problem.devices[device].profile
    work: dict[tuple[int, int, int], float] = {}     # a few distinct (split, rows) among many batches
    out = []
    for t in timings:
        key = (t.first, t.last, t.rows)
        if key not in work:
            c = split_cost(problem, prof, t.first, t.last, t.rows, False)
            work[key] = c.work_s - problem.overheads.per_batch_s     # the worker's fixed part is its own
        out.append(t.round_trip_s - work[key])
    return out


def compute_scale_sample(problem: Problem, splits: Sequence[Sequence[int]], busy_s: Sequence[float],
                         batches: Sequence[int], rows_in: Sequence[int], min_batches: int = 8,
                         device: int = 0) -> float | None:
    """Measured compute over the profile's for one interval of one plan (per split: its workers'
    compute seconds, its batches and the rows that entered it), or None with too few batches."""
    if sum(batches) < min_batches:
        return None
    expected = sum(profiled_compute(problem, splits, batches, rows_in, device))
    return sum(busy_s) / expected if expected > 0 else None


def profiled_compute(problem: Problem, splits: Sequence[Sequence[int]], batches: Sequence[int],
                     rows_in: Sequence[int], device: int = 0) -> list[float]:
    """Per split of one interval: the profile's compute of its batches at their mean rows, unscaled
    (0 for a split that ran none)."""
    prof = problem.devices[device].profile
    base = dataclasses.replace(problem, overheads=dataclasses.replace(problem.overheads, compute_scale=1.0))
    out = []
    for (first, last), n, rows in zip(splits, batches, rows_in):
        if not n:
            out.append(0.0)
            continue
        c = split_cost(base, prof, first, last, rows / n, False)
        out.append(n * (c.compute_s + c.exit_s + c.sampled_s))
    return out


def split_compute_rows(problem: Problem, splits: Sequence[Sequence[int]], busy_s: Sequence[float],
                       batches: Sequence[int], rows_in: Sequence[int], device: int = 0) -> list[tuple[float, int, float]]:
    """Per split of one interval that ran batches: (the profile's compute of its batches, unscaled;
    its batches; its workers' measured compute seconds)."""
    profiled = profiled_compute(problem, splits, batches, rows_in, device)
    return [(p, int(n), float(busy)) for p, n, busy in zip(profiled, batches, busy_s) if n]


@dataclass(frozen=True)
class WorkerTime:
    """The workers' compute per batch: `scale` times the profile's at its rows, plus `fixed_s`."""

    scale: float
    fixed_s: float


class ComputeFit:
    """Fits the workers' compute seconds of each split over an interval as scale * the profile's
    compute at its rows + fixed * its batches (neither negative), through the last `window` intervals.

    One ratio of measured to profiled compute mixes the two: measured on MiniLM, 2 workers of one
    thread, the ratio was 1.32 on the stock plan (one 6-block split), 1.52 on e3's 1 + 5 blocks, 1.68
    on the EE model as is and 1.75 on it at batch 1 (a split per block): a fixed part per batch that
    a one-block split pays six times as often. Valued with one plan's ratio the others came out
    wrong both ways (stock under, many splits over). The terms are told apart only when the splits
    observed differ enough in profiled compute per batch."""

    def __init__(self, window: int = 24, min_batches: int = 8, min_spread: float = 1.5):
        self.min_batches, self.min_spread = min_batches, min_spread
        self._intervals: deque[list[tuple[float, int, float]]] = deque(maxlen=window)

    def add(self, rows: list[tuple[float, int, float]]) -> None:
        """One interval's splits: (profiled compute, batches, measured compute) each (split_compute_rows)."""
        kept = [r for r in rows if r[1] >= self.min_batches and r[0] > 0 and r[2] >= 0]
        if kept:
            self._intervals.append(kept)

    def fit(self) -> WorkerTime | None:
        """Both terms, or None until the splits seen spread enough in profiled compute per batch."""
        rows = [r for interval in self._intervals for r in interval]
        per_batch = [p / n for p, n, _ in rows]
        if len(rows) < 3 or max(per_batch) < self.min_spread * min(per_batch):
            return None
        x = np.array([[p, n] for p, n, _ in rows], dtype=float)
        y = np.array([b for _, _, b in rows], dtype=float)
        scale = x.max(axis=0)
        coef = _nonnegative_least_squares(x / scale, y) / scale
        if coef[0] <= 0:
            return None               # all fixed cost: not a picture of compute that scales with rows
        return WorkerTime(float(coef[0]), float(coef[1]))


def machine_cpu_s() -> float | None:
    """CPU seconds every process on this machine has used (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds process `pid` has used (its threads included), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def others_share(machine_s: float, own_s: float, wall_s: float, cores: int) -> float:
    """The share of the machine that processes other than ours used over `wall_s` seconds."""
    return max(0.0, machine_s - own_s) / max(wall_s * cores, 1e-9)


def blend(old: float, samples: Sequence[float], weight: float = 0.3) -> float:
    """Move an estimate toward an interval's median, never below 0."""
    if not samples:
        return old
    return max(0.0, (1 - weight) * old + weight * statistics.median(samples))


def node_seconds_per_request(cpu_s: float, requests: int, min_requests: int = 100) -> float | None:
    """The node's CPU per request over an interval, or None when too few requests came to tell."""
    if requests < min_requests or cpu_s < 0:
        return None
    return cpu_s / requests


@dataclass(frozen=True)
class NodeCpu:
    """The node's CPU split into its terms: cores it takes at no load, CPU per request, CPU per batch."""

    fixed_cores: float
    s_per_request: float
    s_per_batch: float


class NodeCpuFit:
    """Fits cpu = fixed * wall + per_request * requests + per_batch * batches (no term negative)
    through the last `window` intervals.

    One ratio of CPU to requests mixes the three: measured on a digits node it fell from 1.5-1.7 ms
    at 140 req/s (a batch per request) to 0.67 ms at 840 req/s (bench/results/node_cpu_digits.md),
    and a planner that priced capacity at the first figure predicted half the goodput it got. The
    split is told apart only when the intervals differ in rate and in rows per batch."""

    def __init__(self, window: int = 24, min_intervals: int = 6, min_rows_spread: float = 1.5):
        self.min_intervals, self.min_rows_spread = min_intervals, min_rows_spread
        self._rows: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self._entry: deque[float | None] = deque(maxlen=window)

    def add(self, wall_s: float, requests: int, batches: int, cpu_s: float, entry_rows: float | None = None) -> None:
        """One interval: its wall and CPU seconds, requests admitted, batches of every split, and the
        mean rows of its first split's batches (None when it ran none)."""
        if wall_s > 0 and cpu_s >= 0 and requests >= 0 and batches >= 0:
            self._rows.append((wall_s, float(requests), float(batches), cpu_s))
            self._entry.append(entry_rows)

    def busiest_entry_rows(self) -> float | None:
        """Rows per first-split batch in the interval of the highest request rate: batches grow with
        load, so this is the most a batch was seen to gather (None before any)."""
        busy = [(n / w, e) for (w, n, _, _), e in zip(self._rows, self._entry) if n > 0 and e is not None]
        return max(busy)[1] if busy else None

    def fit(self) -> NodeCpu | None:
        """The three terms, or None until the intervals spread enough to tell them apart."""
        busy = [(n / m) for _, n, m, _ in self._rows if m > 0 and n > 0]
        if len(self._rows) < self.min_intervals or len(busy) < 2 or max(busy) < self.min_rows_spread * min(busy):
            return None
        x = np.array([r[:3] for r in self._rows])
        y = np.array([r[3] for r in self._rows])
        scale = x.max(axis=0)
        scale[scale == 0] = 1.0
        coef = _nonnegative_least_squares(x / scale, y) / scale
        return NodeCpu(float(coef[0]), float(coef[1]), float(coef[2]))


def _nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin |x c - y| over c >= 0, for a handful of columns: every subset of them, solved free,
    the best whose coefficients are all non-negative (the empty subset, c = 0, always is)."""
    best, best_err = np.zeros(x.shape[1]), float(y @ y)
    cols = range(x.shape[1])
    for k in range(1, x.shape[1] + 1):
        for subset in itertools.combinations(cols, k):
            c_sub = np.linalg.lstsq(x[:, subset], y, rcond=None)[0]
            if (c_sub < 0).any():
                continue
            c = np.zeros(x.shape[1])
            c[list(subset)] = c_sub
            err = float(np.sum((x @ c - y) ** 2))
            if err < best_err - 1e-15:
                best, best_err = c, err
    return best


def thread_schedstat() -> tuple[float, float] | None:
    """(seconds run, seconds waited runnable on a run queue) of the calling thread (Linux
    /proc/thread-self/schedstat), or None where it cannot be read."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            run_ns, wait_ns = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    return run_ns / 1e9, wait_ns / 1e9


def core_share(run_s: float, wait_s: float, min_run_s: float = 0.05) -> float | None:
    """The share of a core a thread got while it had work, over an interval in which it ran
    `run_s` and waited runnable `wait_s`; None when it ran too little to tell."""
    if run_s < min_run_s or wait_s < 0:
        return None
    return run_s / (run_s + wait_s)


def shares_cores(cores: int, worker_threads: int, inline: bool) -> bool:
    """Whether the node's CPU comes out of the workers' time: inline engines run in the node itself;
    worker processes leave the node a core only when their threads do not take them all."""
    return inline or worker_threads >= cores
