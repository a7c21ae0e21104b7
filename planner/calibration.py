"""The running node's measurements, turned into the cost model's overheads (cost_model.Overheads).

- Per-batch cost: a batch sent to an idle worker holds no queueing at the
  worker, so its round trip less the profile's compute at its rows is what a
  batch costs beyond the profile (the node's dispatch, the messages to and
  from the worker, gathering rows from slots, CPU shared with the node).
- The node's time per request: the node process's CPU seconds over an
  interval divided by the requests it admitted in it (HTTP, decoding,
  tokenizing, admission, answering, and the pump's share per request).
- Whether the node shares the workers' cores: when the workers' threads
  take every core, each second the node computes is a second a worker does not.

Every estimate is blended toward each interval's figure, never jumps to it: one
interval of a noisy 2-core machine must not swing the plan.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

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
            work[key] = c.work_s - c.per_batch_s
        out.append(t.round_trip_s - work[key])
    return out


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


def shares_cores(cores: int, worker_threads: int, inline: bool) -> bool:
    """Whether the node's CPU comes out of the workers' time: inline engines run in the node itself;
    worker processes leave the node a core only when their threads do not take them all."""
    return inline or worker_threads >= cores
