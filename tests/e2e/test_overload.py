"""A real e3-node past capacity: a burst gets fast 503s rather than late 200s, concurrent large
bodies stay within the body budget's memory, slow clients are cut off (process workers)."""
import asyncio
import io
import json
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from bench.nodes import Node, free_port
from bench.soak import rss_mb
from e3.models.digits import load_testset

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SLO_MS = 100


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(default_dir, tmp_path_factory):
    config = {"model": {"path": str(default_dir)}, "workers": {"cpu_workers": 2},
              "batching": {"slo_ms": SLO_MS}, "replan": {"enabled": False},
              "server": {"port": free_port(), "max_reading_bytes": 24 * 2**20, "body_timeout_s": 1.0,
                         "idle_timeout_s": 5.0}}
    async with Node(config, tmp_path_factory.mktemp("overload") / "node.log") as n:
        yield n


@pytest.fixture(scope="module")
def digit_body(default_dir):
    x, _ = load_testset(default_dir)
    row = [round(v, 4) for v in x[0].flatten().tolist()]
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, len(row)], "data": row}]})


async def timed_post(session, url, body, **kw):
    t0 = time.perf_counter()
    if len(body) > 2**20:      # aiohttp warns that a large bytes body would be sent in one go
        body = io.BytesIO(body.encode())
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}, **kw) as r:
            payload = await r.json()
            return r.status, (time.perf_counter() - t0) * 1000, payload, r.headers.get("Retry-After")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return 0, (time.perf_counter() - t0) * 1000, {"error": repr(exc)}, None


@pytest.mark.asyncio(loop_scope="module")
async def test_a_burst_past_capacity_is_refused_fast_and_what_is_admitted_is_on_time(node, digit_body):
    url = f"{node.url}/v2/models/{node.model_name}/infer"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=10)) as s:
        for _ in range(20):                            # warm: every worker has run a batch
            assert (await timed_post(s, url, digit_body))[0] == 200
        # Light load, 4 at a time: how punctual this machine lets the node be right now
        # (the yardstick below, so that a test run on a shared machine judges the gate, not the load).
        m0 = await node_metrics(node)
        for _ in range(10):
            assert {r[0] for r in await asyncio.gather(*(timed_post(s, url, digit_body) for _ in range(4)))} == {200}
        light = on_time_share(m0, await node_metrics(node))
        # Two waves of requests at ~500 req/s: several times what this node answers in a
        # second. The first teaches the gate's adaptive limit; the second is judged.
        first = await wave(s, url, digit_body, 200)
        assert {status for status, *_ in first} <= {200, 503}
        before = await node_metrics(node)
        results = await wave(s, url, digit_body, 400)
        after = await node_metrics(node)
    by = {}
    for status, ms, payload, retry in results:
        by.setdefault(status, []).append((ms, payload, retry))
    # a 504 is an admitted request the node could not answer in time: the gate's limit lets a few
    # through on a slow shared machine (seen: in a clean-clone CI run here), never many
    assert set(by) <= {200, 503, 504}, {k: v[0][1] for k, v in by.items() if k not in (200, 503, 504)}
    refused, answered, late = by.get(503, []), by.get(200, []), by.get(504, [])
    assert len(late) <= 8, f"{len(late)} of 400 requests admitted past capacity ran out their deadline"
    assert len(refused) + len(answered) + len(late) == 400
    assert all(retry == "1" and "error" in payload for _, payload, retry in refused)
    gate = {k: v - before.get(k, 0) for k, v in after.items() if k.startswith("e3_http_refused_total")}
    assert sum(gate.values()) >= 0.8 * len(refused), gate        # refused by the gate, before the body
    # No input admitted was left to its deadline: the node answered all it took on.
    assert after.get('e3_failures_total{reason="DeadlineExceededError"}', 0) == \
        before.get('e3_failures_total{reason="DeadlineExceededError"}', 0)
    # Punctuality, from the node's own counts (a client too slowed by a shared machine to
    # overload the node gets everything answered, on time: that passes too). It is the gate's to keep only while the event
    # loop keeps up with arrivals: when this test's own client, sharing the cores, saturates the
    # loop (the gate then refuses on loop lag), every callback waits whatever is admitted.
    share = on_time_share(before, after)
    if gate.get('e3_http_refused_total{reason="loop_lag"}', 0) > 0.2 * len(refused):
        pytest.skip(f"event loop saturated by arrivals (gate refusals {gate}); on time {share:.0%} vs "
                    f"{light:.0%} at light load: punctuality not judged on this machine now")
    assert share >= 0.9 * light, (share, light, gate)


def on_time_share(before: dict, after: dict) -> float:
    """Of the inputs the node answered between two /metrics readings, the share within the SLO."""
    answered = 'e3_inputs_total{outcome="answered"}'
    return (after["e3_within_slo_total"] - before["e3_within_slo_total"]) / (after[answered] - before[answered])


async def wave(session, url, body, n):
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(timed_post(session, url, body)))
        if i % 25 == 24:
            await asyncio.sleep(0.05)
    return await asyncio.gather(*tasks)


async def node_metrics(node) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(node.url + "/metrics") as r:
        text = await r.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("e3_") and not line.startswith("#")}


async def open_post(host: str, port: int, path: str, body: bytes, first: int):
    """A POST whose headers and first `first` bytes of body are sent, the rest held back."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:first])
    await writer.drain()
    return reader, writer


async def answer_of(reader, timeout_s: float) -> tuple[int, dict] | None:
    """The status and JSON body of a response, or None if none comes within `timeout_s` (the
    response, not the connection's end: after a refusal the server may linger on the unsent body)."""
    async def read() -> tuple[int, dict]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n")
                      if line.lower().startswith("content-length:"))
        return int(head.split()[1]), json.loads(await reader.readexactly(length))
    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        return None


def large_body() -> str:
    """7.9 MB of JSON numbers (under the 8 MiB body limit): a valid request's shape, cut short (the node
    answers 400)."""
    rows = 400_000 // 64                       # 400,000 numbers of 20 characters, then cut to 7.9 MB
    text = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64],
                                   "data": [0.123456] * (rows * 64)}]})
    text = text.replace("0.123456", "0.1234567891234567")[: 7_900_000 - 2]
    return text[: text.rfind(",")] + "]}]}"


@pytest.mark.asyncio(loop_scope="module")
async def test_sixteen_large_bodies_in_flight_at_once_are_refused_past_the_reading_budget(node):
    """16 bodies of 7.9 MB in flight at once by construction (headers and a first 64 kB sent, the
    rest never): the 24 MiB budget lets at most 3 be read, which time out (408), and refuses the
    others with 503 before reading them, whatever the machine's speed."""
    body = large_body().encode()
    host, port = "127.0.0.1", int(node.url.rsplit(":", 1)[1])
    path = f"/v2/models/{node.model_name}/infer"
    posts = [await open_post(host, port, path, body, 64 * 1024) for _ in range(16)]
    answers = await asyncio.gather(*(answer_of(r, 20) for r, _ in posts))
    for _, w in posts:
        w.close()
    statuses = sorted(a[0] for a in answers if a is not None)
    assert len(body) > 7_800_000 and len(statuses) == 16 and set(statuses) <= {408, 503}, answers
    assert statuses.count(408) <= 3 and all("error" in a[1] for a in answers), statuses
    assert any("server.max_reading_bytes" in a[1]["error"] for a in answers), answers


@pytest.mark.asyncio(loop_scope="module")
async def test_sixteen_concurrent_large_bodies_stay_within_the_reading_budget(node):
    """The same 16 bodies sent whole and at once: each is refused or read and found bad, as JSON,
    and the node's memory stays bounded however many overlap on this machine."""
    body = large_body()
    url = f"{node.url}/v2/models/{node.model_name}/infer"
    before = rss_mb(node.proc.pid)
    peak, done = [before], asyncio.Event()

    async def watch():
        while not done.is_set():
            peak.append(rss_mb(node.proc.pid))
            await asyncio.sleep(0.02)
    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        results = await asyncio.gather(*(timed_post(s, url, body) for _ in range(16)))
    done.set()
    await watcher
    assert {r[0] for r in results} <= {400, 503}, sorted(r[0] for r in results)
    assert all("error" in r[2] for r in results)
    assert max(peak) - before < 200, (before, max(peak))


@pytest.mark.asyncio(loop_scope="module")
async def test_slow_headers_are_cut_off_and_a_slow_body_gets_408(node):
    host, port = "127.0.0.1", int(node.url.rsplit(":", 1)[1])
    r, w = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    for ch in b"POST /v2/models/x/infer HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n":  # a byte every 0.2 s
        if r.at_eof():
            break
        w.write(bytes([ch]))
        await w.drain()
        await asyncio.sleep(0.2)
    assert await asyncio.wait_for(r.read(), 8) == b""
    assert 4.8 < time.monotonic() - t0 < 10
    w.close()
    r, w = await asyncio.open_connection(host, port)
    w.write(f"POST /v2/models/{node.model_name}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{".encode())
    await w.drain()
    t0 = time.monotonic()
    answer = await asyncio.wait_for(r.read(), 5)      # the 408, then the node closes the connection
    assert answer.startswith(b"HTTP/1.1 408") and b"server.body_timeout_s" in answer
    assert 0.8 < time.monotonic() - t0 < 4
    w.close()
