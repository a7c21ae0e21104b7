"""Row queues in front of each split: the admission batcher and the rebatchers.

Every split's entry keeps the plan's batch size B. Rows wait here until B of
them can go together, or until waiting longer would break the oldest row's
SLO: its SLO time minus the estimated time still to run (`budget_s`). A
rebatcher is the same queue fed by the survivors of several upstream batches,
which is how survivors merge back into full batches.

Pure logic: time comes from the caller, so tests need no sleeps.
"""
from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import OverloadedError


@dataclass(eq=False)
class Sample:
    """One input of a request, from admission to its single answer."""

    rid: int
    future: asyncio.Future
    arrived: float
    slo_at: float          # when batches must flush for it to meet its SLO (the SLO less a reserve)
    deadline: float        # hard deadline: past it the sample is answered with an error
    epoch: int = 0
    row: Any = None        # the encoded input (a one-row BatchState) until admitted to a slot

    def answer(self, result) -> bool:
        """Deliver the result unless an answer was already given (exactly once)."""
        if self.future.done():
            return False
        self.future.set_result(result)
        return True

    def fail(self, exc: BaseException) -> bool:
        if self.future.done():
            return False
        self.future.set_exception(exc)
        return True


@dataclass(eq=False)
class Row:
    """A sample waiting at a split's entry, and where its state lies (ring slot, row)."""

    sample: Sample
    slot: int | None = None
    pos: int = 0
    queued_at: float = 0.0    # when it joined this split's queue (loop clock): queue time metrics


@dataclass
class QueueStats:
    """Backpressure view of one queue (like anyio's MemoryObjectStreamStatistics)."""

    rows: int
    capacity: int | None
    oldest_wait_s: float


class RowQueue:
    """FIFO of rows for one split; says when a batch is due and hands it out."""

    def __init__(self, batch: int, capacity: int | None = None, eager: bool = False,
                  work_conserving: bool = False, max_delay_s: float | None = None):
        """`eager`: hand out whatever waits at once instead of filling a batch (the EE model
        batched as is, where survivors go on as a shrunken batch; a baseline, not E3).
        `work_conserving`: a partial batch is due when the worker that would take it is idle:
        waiting for rows pays only while the worker is busy anyway (the batch fills for free);
        in front of an idle worker it buys nothing but latency.
        `capacity`, `max_delay_s`: push refuses rows while the queue holds `capacity` rows or its
        oldest row has waited longer than `max_delay_s` (admission control)."""
        if batch < 1:
            raise ValueError(f"batch size must be at least 1, got {batch}")
        self.batch, self.capacity, self.eager = batch, capacity, eager
        self.work_conserving, self.max_delay_s = work_conserving, max_delay_s
        # When the pump last dispatched from this queue. Rows it left behind wait for workers;
        # rows that came after it wait only for the loop (a burst of calls being admitted).
        self.looked_at = -math.inf
        self._rows: collections.deque[Row] = collections.deque()
        self.draining = False   # flush whatever is there (the epoch is retiring)

    def __len__(self) -> int:
        return len(self._rows)

    def push(self, rows: Iterable[Row], now: float | None = None) -> None:
        """Append rows; OverloadedError if the queue is full, or (given `now`) too far behind."""
        rows = list(rows)
        if self.capacity is not None and len(self._rows) + len(rows) > self.capacity:
            raise OverloadedError(
                f"admission queue full ({len(self._rows)} of {self.capacity} rows waiting)")
        if self.max_delay_s is not None and now is not None and self._rows:
            head, behind = self._rows[0], now - self._rows[0].queued_at
            if behind > self.max_delay_s and head.queued_at <= self.looked_at:
                raise OverloadedError(f"admission queue is {behind * 1e3:.0f} ms behind (limit "
                                      f"{self.max_delay_s * 1e3:.0f} ms, batching.max_queue_delay_ms)")
        self._rows.extend(rows)

    def push_front(self, rows: list[Row]) -> None:
        """Return rows taken for a batch that could not leave (no free slot), in order."""
        self._rows.extendleft(reversed(rows))

    def flush_at(self, budget_s: float) -> float | None:
        """When the earliest SLO among waiting rows forces a partial batch out."""
        if not self._rows:
            return None
        return min(r.sample.slo_at for r in self._rows) - budget_s

    def due(self, now: float, budget_s: float, worker_idle: bool = False, ring_full: bool = False) -> bool:
        """Whether a batch should leave now. `ring_full`: no more rows can arrive before some
        leave (the slots they would come in are all taken), so waiting buys only latency."""
        if not self._rows:
            return False
        if len(self._rows) >= self.batch or self.draining or self.eager or ring_full or \
                (self.work_conserving and worker_idle):
            return True
        return now >= self.flush_at(budget_s)

    def take(self) -> list[Row]:
        """Up to B rows, oldest first."""
        n = min(self.batch, len(self._rows))
        return [self._rows.popleft() for _ in range(n)]

    def take_all(self) -> list[Row]:
        rows, self._rows = list(self._rows), collections.deque()
        return rows

    def expire(self, now: float) -> list[Row]:
        """Remove and return the rows whose hard deadline has passed or that were answered."""
        def gone(r: Row) -> bool:
            return r.sample.deadline <= now or r.sample.future.done()
        dead = [r for r in self._rows if gone(r)]
        if dead:
            self._rows = collections.deque(r for r in self._rows if not gone(r))
        return dead

    def statistics(self, now: float) -> QueueStats:
        oldest = now - self._rows[0].sample.arrived if self._rows else 0.0
        return QueueStats(len(self._rows), self.capacity, oldest)
