"""The node's request entry path over real sockets: refusal before the body is read, the body
budget, body and header timeouts, the connection cap (in-process runtime, inline engine)."""
import asyncio
import json
import time
from pathlib import Path

import pytest

from e3.models.policies import make_policy
from e3.models.registry import LoadedModel
from e3.runtime.http import GATE_KEY, make_app
from e3.runtime.listener import make_runner, make_site
from e3.runtime.runtime import Runtime
from tests.runtime.test_runtime_inline import INPUTS, config
from tests.support.mlp import WIDTH, MLPModel

BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, WIDTH],
                               "data": INPUTS[0]}]}).encode()


@pytest.fixture
async def node():
    """(host, port, app) of a real listener; the test's settings go in through `node.settings`."""
    cfg = config(batch=4, cuts=(1, 3), max_queue=8)
    cfg.server.max_body_bytes, cfg.server.max_inputs = 64 * 1024, 8
    cfg.server.max_reading_bytes, cfg.server.body_timeout_s = 100 * 1024, 0.5
    cfg.server.idle_timeout_s, cfg.server.max_connections, cfg.server.port = 0.5, 3, 0
    cfg.server.max_backlog_ms = 50
    rt = Runtime(cfg, model=LoadedModel(MLPModel(), make_policy("patience", 2), Path(".")))
    await rt.start()
    app = make_app(rt)
    runner = make_runner(app, cfg.server)
    await runner.setup()
    site = make_site(runner, cfg.server)
    await site.start()
    yield "127.0.0.1", site.port, app, site
    await runner.cleanup()
    await rt.close()


async def close(*writers: asyncio.StreamWriter) -> None:
    for w in writers:
        w.close()
        try:
            await w.wait_closed()
        except ConnectionError:
            pass


def head(length: int) -> bytes:
    return (f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Status, headers and body of one HTTP/1.1 answer read off a raw socket."""
    status_line = await asyncio.wait_for(reader.readline(), timeout)
    headers = {}
    while (line := await asyncio.wait_for(reader.readline(), timeout)) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), timeout)
    return int(status_line.split()[1]), headers, body


async def test_a_refusal_comes_before_the_body_is_read(node):
    host, port, app, _ = node
    app[GATE_KEY]._backlog = lambda: 10.0          # the runtime far behind
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head(50_000))                    # headers only: the body never comes
    await writer.drain()
    t0 = time.monotonic()
    status, headers, body = await answer(reader)
    assert status == 503 and headers["retry-after"] == "1"
    assert "admission queue is 10000 ms behind" in json.loads(body)["error"]
    assert time.monotonic() - t0 < 0.4            # not after the body timeout: nothing waited for the body
    assert app[GATE_KEY].statistics().refused == {"backlog": 1}
    await close(writer)


async def test_concurrent_large_bodies_beyond_the_budget_get_503_and_a_slow_body_408(node):
    host, port, app, _ = node
    slow_r, slow_w = await asyncio.open_connection(host, port)
    slow_w.write(head(60_000) + b"{")             # holds 60 kB of the 100 kB budget while it trickles
    await slow_w.drain()
    await asyncio.sleep(0.05)
    assert app[GATE_KEY].statistics().body_bytes == 60_000
    r, w = await asyncio.open_connection(host, port)
    w.write(head(50_000))
    await w.drain()
    status, _, body = await answer(r)
    assert status == 503 and "bytes of request bodies being read" in json.loads(body)["error"]
    t0 = time.monotonic()
    status, headers, body = await answer(slow_r)
    assert status == 408 and "server.body_timeout_s" in json.loads(body)["error"]
    assert 0.3 < time.monotonic() - t0 < 2.0 and headers.get("connection") == "close"
    assert await asyncio.wait_for(slow_r.read(), 2) == b""        # closed by the node
    assert app[GATE_KEY].statistics().body_bytes == 0
    await close(w, slow_w)


async def test_an_answer_still_comes_and_the_gate_is_left_empty(node):
    host, port, app, _ = node
    r, w = await asyncio.open_connection(host, port)
    for _ in range(2):                            # keep-alive: two requests on one connection
        w.write(head(len(BODY)) + BODY)
        await w.drain()
        status, _, body = await answer(r)
        assert status == 200 and json.loads(body)["outputs"]
    stats = app[GATE_KEY].statistics()
    assert (stats.inflight, stats.body_bytes) == (0, 0)
    await close(w)


async def test_a_connection_that_never_finishes_its_headers_is_closed(node):
    host, port, _, _ = node
    r, w = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    for ch in b"POST /v2/models/mlp/infer HTTP/1.1\r\nHo":   # slowloris: a byte every 50 ms
        w.write(bytes([ch]))
        await w.drain()
        await asyncio.sleep(0.05)
        if r.at_eof():
            break
    assert await asyncio.wait_for(r.read(), 3) == b""
    assert 0.4 < time.monotonic() - t0 < 2.5
    await close(w)


async def test_connections_beyond_the_cap_get_a_json_503_and_are_closed(node):
    host, port, _, site = node
    held = [await asyncio.open_connection(host, port) for _ in range(3)]
    await asyncio.sleep(0.05)
    r, w = await asyncio.open_connection(host, port)
    status, headers, body = await answer(r)
    assert status == 503 and headers["retry-after"] == "1" and "too many open connections" in json.loads(body)["error"]
    assert await asyncio.wait_for(r.read(), 2) == b"" and site.refused == 1
    await close(w, *(hw for _, hw in held))
    await asyncio.sleep(0.1)
    r, w = await asyncio.open_connection(host, port)   # places freed: served again
    w.write(head(len(BODY)) + BODY)
    await w.drain()
    assert (await answer(r))[0] == 200
    await close(w)
