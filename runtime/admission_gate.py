"""The HTTP layer's admission gate: refuse a request before its body is read, parsed or encoded.

Past capacity, a refusal that comes after reading, parsing and encoding costs the
event loop nearly what an answer costs, so refusing late does not free the loop to
answer what it admitted. The gate decides from what is known when the headers
arrive, before any of that work:

- requests in flight in the HTTP layer: a hard cap, and below it an adaptive limit (AIMD, the
  pattern of Netflix's concurrency-limits): it grows while answers come within the target
  latency and the limit is what holds requests back, and shrinks by a factor when one comes
  late. Past capacity it settles near capacity x target latency (Little's law), so what is
  admitted is answered on time and the rest is refused, not queued behind it;
- bytes of request bodies being read or parsed: a budget, charged from Content-Length
  (a body of unknown length is charged the largest allowed), so that concurrent large
  bodies cannot grow the node's memory without bound;
- the runtime's backlog: how long the oldest input waiting for admission has waited.
  An arrival would queue behind it, so past the limit it would miss its SLO;
- the event loop's lag (LoopLagProbe): when the loop itself is behind, every request it
  takes on delays the answers of those already admitted.

Pure logic: time and the backlog come from callables the caller passes, so tests
drive them without sleeps.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import OverloadedError


MIN_LIMIT = 8            # the adaptive limit never goes below this many requests in flight
GROWTH = 8.0             # on-time answers add GROWTH / limit (about +GROWTH per limit answers)
BACKOFF = 0.9            # a late answer multiplies the limit by this, at most once per half target
LAG_MIN_INFLIGHT = 8     # a loop that is behind with fewer requests in flight is behind for another
                         # reason (a pause, a plan being applied): refusing requests would not help


class Refused(OverloadedError):
    """Raised by AdmissionGate.admit; `reason` names the limit (a metrics label)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class GateStats:
    """A snapshot of the gate (the pattern of anyio's stream statistics())."""

    inflight: int
    max_inflight: int
    limit: float
    body_bytes: int
    max_body_bytes: int
    backlog_s: float
    max_backlog_s: float
    loop_lag_s: float
    max_loop_lag_s: float
    refused: dict[str, int] = field(default_factory=dict)


class Ticket:
    """One admitted request: holds its in-flight place until closed and its body bytes
    until the body is parsed (body_done), whichever way the handler leaves."""

    def __init__(self, gate: "AdmissionGate", body_bytes: int, started: float):
        self._gate, self._body_bytes, self._open, self.started = gate, body_bytes, True, started

    def answered(self) -> None:
        """The request got its answer: its latency steers the adaptive limit."""
        self._gate._on_answer(self._gate.clock() - self.started)

    def body_done(self) -> None:
        """The body is parsed: what is kept of it is the inputs, not the bytes."""
        self._gate._body_bytes -= self._body_bytes
        self._body_bytes = 0

    def close(self) -> None:
        if self._open:
            self._open = False
            self.body_done()
            self._gate._inflight -= 1

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AdmissionGate:
    """Admits or refuses requests from their headers alone (see the module docstring)."""

    def __init__(self, *, max_inflight: int, max_body_bytes: int, largest_body: int, max_backlog_s: float,
                 max_loop_lag_s: float, target_latency_s: float, adaptive: bool = True, backlog: Callable[[], float] = lambda: 0.0,
                 clock: Callable[[], float] = time.monotonic):
        """`largest_body`: the charge for a body of unknown length (the per-request limit).
        `target_latency_s`: an answer later than this (admission to answer) shrinks the limit.
        `backlog()`: seconds the oldest input waiting for admission has waited."""
        self.target_latency_s, self.clock, self.adaptive = target_latency_s, clock, adaptive
        # It starts at the hard cap: a node that has not yet answered late has no reason to hold
        # a burst back (the first late answers teach it, within one target latency).
        self.limit = float(max_inflight)
        self._backed_off_at = -float("inf")
        self.max_inflight, self.max_body_bytes, self.largest_body = max_inflight, max_body_bytes, largest_body
        self.max_backlog_s, self.max_loop_lag_s, self._backlog = max_backlog_s, max_loop_lag_s, backlog
        self._inflight = 0
        self._body_bytes = 0
        self.loop_lag_s = 0.0
        self.refused: dict[str, int] = {}

    def admit(self, content_length: int | None) -> Ticket:
        """A ticket for a request whose body declares `content_length` bytes; Refused if over a limit."""
        charge = self.largest_body if content_length is None else min(content_length, self.largest_body)
        if self._inflight >= self.max_inflight:
            self._refuse("inflight", f"{self._inflight} requests in flight (limit {self.max_inflight}, "
                                     "server.max_inflight_requests)")
        if self._inflight >= self.limit:
            self._refuse("concurrency", f"{self._inflight} requests in flight, the most this node now answers "
                                        f"within {self.target_latency_s * 1e3:.0f} ms")
        if self.loop_lag_s > self.max_loop_lag_s and self._inflight >= LAG_MIN_INFLIGHT:
            self._refuse("loop_lag", f"the node's event loop is {self.loop_lag_s * 1e3:.0f} ms behind (limit "
                                     f"{self.max_loop_lag_s * 1e3:.0f} ms, server.max_loop_lag_ms)")
        backlog = self._backlog()
        if backlog > self.max_backlog_s:
            self._refuse("backlog", f"admission queue is {backlog * 1e3:.0f} ms behind (limit "
                                    f"{self.max_backlog_s * 1e3:.0f} ms, server.max_backlog_ms)")
        if charge and self._body_bytes + charge > self.max_body_bytes:
            self._refuse("body_bytes", f"{self._body_bytes} bytes of request bodies being read; {charge} more "
                                       f"would pass the limit {self.max_body_bytes} (server.max_reading_bytes)")
        self._inflight += 1
        self._body_bytes += charge
        return Ticket(self, charge, self.clock())

    def _on_answer(self, latency_s: float) -> None:
        if not self.adaptive:
            return
        now = self.clock()
        if latency_s > self.target_latency_s:
            # One late batch makes many late answers at once: back off once for them all.
            if now - self._backed_off_at >= self.target_latency_s / 2:
                self.limit = max(float(MIN_LIMIT), self.limit * BACKOFF)
                self._backed_off_at = now
        elif self._inflight * 2 >= self.limit:     # grow only while the limit is what holds requests back
            self.limit = min(float(self.max_inflight), self.limit + GROWTH / self.limit)

    def _refuse(self, reason: str, message: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        raise Refused(reason, message)

    def statistics(self) -> GateStats:
        return GateStats(self._inflight, self.max_inflight, round(self.limit, 2), self._body_bytes, self.max_body_bytes,
                         self._backlog(), self.max_backlog_s, self.loop_lag_s, self.max_loop_lag_s,
                         dict(self.refused))


class LoopLagProbe:
    """Measures how late the event loop runs a timer, and tells the gate.

    Every `interval_s` it sleeps and records how much longer than asked the sleep took:
    the time callbacks already due waited for the loop. The latest figure stands until
    the next one (a free loop reports a small lag within one interval)."""

    def __init__(self, gate: AdmissionGate, interval_s: float = 0.01, clock: Callable[[], float] = time.monotonic):
        self.gate, self.interval_s, self.clock = gate, interval_s, clock
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            asked = self.clock()
            await asyncio.sleep(self.interval_s)
            self.gate.loop_lag_s = max(0.0, self.clock() - asked - self.interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.gate.loop_lag_s = 0.0


def gate_for(config, backlog: Callable[[], float] = lambda: 0.0) -> AdmissionGate:
    """The gate of a node configured by `config` (an E3Config).

    Unset limits derive from how long the node lets an input wait for admission
    (batching.max_queue_delay_ms, by default the SLO), the same tolerance the runtime's own
    admission applies after parsing: the backlog limit is half of it, the loop-lag limit and
    the adaptive limit's target keep the SLO's reserve (slo_reserve) apart. A node told to
    queue for seconds rather than refuse (as tests of answers under bursts do) gets a gate
    that tolerates as much."""
    sc, b = config.server, config.batching
    delay_s = b.queue_delay_s
    backlog_s = sc.max_backlog_ms / 1000 if sc.max_backlog_ms is not None else delay_s / 2
    lag_s = sc.max_loop_lag_ms / 1000 if sc.max_loop_lag_ms is not None else max(b.slo_reserve, 0.1) * delay_s
    return AdmissionGate(max_inflight=sc.max_inflight_requests, max_body_bytes=sc.max_reading_bytes,
                         largest_body=sc.max_body_bytes, max_backlog_s=backlog_s, max_loop_lag_s=lag_s,
                         target_latency_s=delay_s * (1 - b.slo_reserve), adaptive=sc.adaptive_limit,
                         backlog=backlog)


def runtime_backlog(runtime) -> Callable[[], float]:
    """`backlog()` for a Runtime: how long the oldest input at its admission queue has waited."""
    def backlog() -> float:
        pipeline = runtime.pipelines.get(runtime.epoch)
        if pipeline is None:
            return 0.0
        return pipeline.stages[0].queue.statistics(asyncio.get_running_loop().time()).oldest_wait_s
    return backlog
