"""The HTTP layer's admission gate as pure logic: limits driven by injected backlog and lag."""
import asyncio
import time

import pytest

from e3.runtime.admission_gate import BACKOFF, LAG_MIN_INFLIGHT, MIN_LIMIT, AdmissionGate, LoopLagProbe, \
    Refused, gate_for
from e3.runtime.config import E3Config
from tests.support.clock import Clock


def gate(**kw):
    args = dict(max_inflight=4, max_body_bytes=1000, largest_body=400, max_backlog_s=0.05, max_loop_lag_s=0.02,
                target_latency_s=0.075)
    return AdmissionGate(**(args | kw))


def refused_reason(g, content_length=0):
    with pytest.raises(Refused) as info:
        g.admit(content_length)
    return info.value.reason


def test_requests_beyond_the_in_flight_cap_are_refused_until_one_finishes():
    g = gate()
    tickets = [g.admit(0) for _ in range(4)]
    assert refused_reason(g) == "inflight"
    tickets[0].close()
    tickets[0].close()                       # closing twice frees one place, not two
    g.admit(0)
    assert refused_reason(g) == "inflight"
    assert g.statistics().inflight == 4 and g.statistics().refused == {"inflight": 2}


def test_body_bytes_are_charged_from_content_length_and_released_once_parsed():
    g = gate()
    a = g.admit(300)
    b = g.admit(None)                         # unknown length: charged the largest body
    assert g.statistics().body_bytes == 700
    assert refused_reason(g, 301) == "body_bytes"
    b.body_done()
    assert g.statistics().body_bytes == 300 and g.statistics().inflight == 2
    with g.admit(10**9):                      # beyond the per-request limit: charged that limit (aiohttp sends 413)
        assert g.statistics().body_bytes == 700
    c = g.admit(400)
    with a, c:
        pass
    assert g.statistics().body_bytes == 0 and g.statistics().inflight == 1


def test_a_backlog_past_the_limit_refuses_new_requests():
    backlog = [0.0]
    g = gate(backlog=lambda: backlog[0])
    g.admit(0).close()
    backlog[0] = 0.051
    assert refused_reason(g) == "backlog"
    assert g.statistics().backlog_s == 0.051
    backlog[0] = 0.01
    g.admit(0).close()


def test_loop_lag_refuses_only_with_requests_in_flight():
    g = gate(max_inflight=100)
    g.loop_lag_s = 0.5
    held = [g.admit(0) for _ in range(LAG_MIN_INFLIGHT)]      # a lagging loop with little in flight: admitted
    assert refused_reason(g) == "loop_lag"
    g.loop_lag_s = 0.01
    held.append(g.admit(0))
    assert len(held) == LAG_MIN_INFLIGHT + 1


def test_defaults_come_from_the_batching_section():
    c = E3Config()
    g = gate_for(c)
    assert g.max_backlog_s == pytest.approx(c.batching.queue_delay_s / 2)
    assert g.max_loop_lag_s == pytest.approx(c.batching.slo_ms * c.batching.slo_reserve / 1000)
    assert g.target_latency_s == pytest.approx(c.batching.slo_ms * (1 - c.batching.slo_reserve) / 1000)
    c.batching.max_queue_delay_ms = 2000           # told to queue rather than refuse: the gate tolerates as much
    g = gate_for(c)
    assert (g.max_backlog_s, g.max_loop_lag_s, g.target_latency_s) == pytest.approx((1.0, 0.5, 1.5))
    c.batching.max_queue_delay_ms = None
    assert (g.max_inflight, g.max_body_bytes, g.largest_body) == \
        (c.server.max_inflight_requests, c.server.max_reading_bytes, c.server.max_body_bytes)
    c.server.max_backlog_ms, c.server.max_loop_lag_ms = 7, 3
    g = gate_for(c)
    assert (g.max_backlog_s, g.max_loop_lag_s) == (0.007, 0.003)


async def test_the_lag_probe_sees_a_blocked_loop_and_then_a_free_one():
    g = gate()
    probe = LoopLagProbe(g, interval_s=0.005)
    probe.start()
    await asyncio.sleep(0.02)
    time.sleep(0.06)                          # the loop is blocked: the probe's timer fires late
    await asyncio.sleep(0.001)
    assert g.loop_lag_s >= 0.04
    await asyncio.sleep(0.05)
    assert g.loop_lag_s < 0.04
    await probe.close()
    assert g.loop_lag_s == 0.0


def answer_after(g, clock, latency_s, n=1):
    for _ in range(n):
        t = g.admit(0)
        clock.t += latency_s
        t.answered()
        t.close()


def test_late_answers_shrink_the_limit_once_per_half_target_and_on_time_ones_grow_it_back():
    clock = Clock(100.0)
    g = gate(max_inflight=100, clock=clock)
    assert g.limit == 100                          # a node that never answered late holds nothing back
    answer_after(g, clock, 0.2)
    assert g.limit == pytest.approx(100 * BACKOFF)
    late = g.admit(0), g.admit(0)                  # one late batch: many late answers at once
    clock.t += 0.2
    for t in late:
        t.answered()
        t.close()
    assert g.limit == pytest.approx(100 * BACKOFF ** 2)   # backed off once for the batch, not twice
    for _ in range(60):
        clock.t += 0.04                           # half the target apart: each backs off
        answer_after(g, clock, 0.2)
    assert g.limit == MIN_LIMIT
    held = [g.admit(0) for _ in range(MIN_LIMIT)]
    assert refused_reason(g) == "concurrency"
    clock.t += 0.01                                # on time while the limit binds: it grows
    for t in held:
        t.answered()
    assert g.limit > MIN_LIMIT
    for t in held:
        t.close()


def test_on_time_answers_at_light_load_do_not_grow_the_limit():
    clock = Clock(100.0)
    g = gate(max_inflight=100, clock=clock)
    for _ in range(30):
        clock.t += 0.04
        answer_after(g, clock, 0.2)
    shrunk = g.limit
    answer_after(g, clock, 0.01, n=50)           # one request at a time: the limit is not what binds
    assert g.limit == shrunk


def test_without_the_adaptive_limit_late_answers_change_nothing():
    clock = Clock(100.0)
    g = gate(max_inflight=100, clock=clock, adaptive=False)
    for _ in range(30):
        clock.t += 0.04
        answer_after(g, clock, 0.2)
    assert g.limit == 100
    c = E3Config()
    c.server.adaptive_limit = False
    assert not gate_for(c).adaptive
