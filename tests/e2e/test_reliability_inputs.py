"""The reliability suite, inputs part: malformed requests against a real `bin/e3-node`.

A node process (worker processes, the digits model, a real socket on 127.0.0.1)
gets well over 1,000 malformed requests made by a seeded generator: broken JSON,
wrong types, shapes and datatypes, values a datatype cannot hold, bodies whose
Content-Encoding lies, broken headers and binary-header lengths, unknown models
and bad URLs, and requests that aiohttp's own parser refuses. Every answer must
be below 500, every error a JSON body with an "error" string, every success
valid JSON (no NaN), and the node's log must hold no traceback or ERROR line.
A gzip bomb (1 GiB of zeros in about 1 MB) is refused with 413 while the
node's RSS, read from /proc, stays bounded.

Run it alone with `pytest -m reliability`.
"""
import asyncio
import gzip
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.support.procs import stop_node

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 64          # the digits model's input: 8x8 digits, flattened
DATATYPES = ["FP64", "FP32", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64",
             "UINT8", "UINT16", "UINT32", "UINT64", "BYTES", "BOOL", "fp32", "", "STRING"]


@pytest.fixture(scope="module")
def node(default_dir, tmp_path_factory):
    """`bin/e3-node` on the digits model: (url, model name, process, its output so far). Its
    admission tolerates queueing up to the request timeout (queue delay and backlog limit): this suite
    checks answers to bad input, not overload, and on a slow machine a valid request queued behind
    the others would be refused with a 503."""
    env = {**os.environ, "E3_CACHE": str(Path(default_dir).parents[1])}
    config = tmp_path_factory.mktemp("node") / "node.json"
    config.write_text(json.dumps({"batching": {"max_queue_delay_ms": 1000.0},
                                      "server": {"adaptive_limit": False, "max_backlog_ms": 1000.0}}))
    proc = subprocess.Popen([sys.executable, str(ROOT / "bin" / "e3-node"), "--model", "digits", "--port", "0",
                             "--grpc-port", "0", "--workers", "2", "--no-replan", "--no-demo-query",
                             "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines, url, name = [], None, None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "Ctrl-C stops it" not in "".join(lines[-1:]):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"serving model '([^']+)' on (http://127\.0\.0\.1:\d+)", line):
            name, url = m.groups()
    assert url, "".join(lines)
    yield url, name, proc
    rest, _ = stop_node(proc, signal.SIGTERM, 60)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "Traceback" not in log and " ERROR " not in log, log


# -- the generator ----------------------------------------------------------------------------------

def http(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    fields = {"Host": "127.0.0.1", "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    return (f"{method} {path} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")
            + "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode("latin-1", "replace")
            + b"\r\n" + body)


def valid_tensor(rng: random.Random, n: int = 1) -> dict:
    return {"name": "input", "datatype": "FP32", "shape": [n, WIDTH],
            "data": [rng.uniform(0, 16) for _ in range(n * WIDTH)]}


JUNK = [None, True, -1, 0, 1.5, 10**30, "", "x" * 300, [], {}, [[[]]], {"a": 1}, [1, "a"], -0.0]


def mutated(rng: random.Random) -> dict:
    """A valid request with one field replaced, dropped or added."""
    body = {"id": "r", "inputs": [valid_tensor(rng)]}
    t = body["inputs"][0]
    where = rng.choice(["body", "tensor", "inputs", "outputs", "parameters"])
    if where == "body":
        body[rng.choice(["inputs", "id", "outputs", "parameters"])] = rng.choice(JUNK)
    elif where == "tensor":
        key = rng.choice(["name", "datatype", "shape", "data", "parameters"])
        if rng.random() < 0.3:
            t.pop(key, None)
        else:
            t[key] = rng.choice(JUNK)
    elif where == "inputs":
        body["inputs"] = rng.choice([[], [t, t], [rng.choice(JUNK)], t])
    elif where == "outputs":
        body["outputs"] = rng.choice([[{"name": rng.choice(["label", "nope", 3, None])}], [{}], [{"name": "label",
                                      "parameters": rng.choice([{"binary_data": "yes"}, {"classification": 2}, 5])}]])
    else:
        body["parameters"] = rng.choice([{"binary_data_output": "no"}, [], 7, {"binary_data_output": True}])
    return body


def shapes(rng: random.Random) -> dict:
    t = valid_tensor(rng)
    t["shape"] = rng.choice([[0, WIDTH], [1], [1, WIDTH + 1], [-1, WIDTH], [2, WIDTH], [10**12, WIDTH],
                             [1, 8, 8], [1, 8, 9], [], [1.0, 64], ["1", "64"], [True, 64]])
    return {"inputs": [t]}


def numbers(rng: random.Random) -> dict:
    """Values a datatype cannot hold, huge numbers, and the wrong datatype."""
    t = valid_tensor(rng)
    datatype = rng.choice(DATATYPES)
    t["datatype"] = datatype
    value = rng.choice([300, -129, -1, 2**70, 2**63, 2**64, 70000.0, 1e39, -1e39, 1.2e29, 1e308, 0.5,
                        "1", None, True])
    t["data"][rng.randrange(WIDTH)] = value
    return {"inputs": [t]}


def body_request(rng: random.Random, name: str, payload: dict | bytes, **headers) -> bytes:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http("POST", f"/v2/models/{name}/infer", raw, {"Content-Type": "application/json", **headers})


def bad_json(rng: random.Random, name: str) -> bytes:
    good = json.dumps({"inputs": [valid_tensor(rng)]}).encode()
    raw = rng.choice([good[:rng.randrange(len(good))], bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
                      b"{", b"[" * 5000, b"null", b'"inputs"', good.replace(b"0", b"NaN", 1),
                      good.replace(b"1", b"Infinity", 1), b"\xff\xfe" + good, good + b"}", b""])
    return body_request(rng, name, raw)


def encodings(rng: random.Random, name: str) -> bytes:
    good = json.dumps({"inputs": [valid_tensor(rng)]}).encode()
    coding, raw = rng.choice([("gzip", good), ("deflate", os.urandom(64)), ("br", os.urandom(64)),
                              ("zstd", good), ("compress", good), ("gzip, br", gzip.compress(good)),
                              ("x-unknown", good), ("gzip", gzip.compress(good)[:-10]),
                              ("deflate", zlib.compress(b"not json at all"))])
    return body_request(rng, name, raw, **{"Content-Encoding": coding})


def headers(rng: random.Random, name: str) -> bytes:
    good = json.dumps({"inputs": [valid_tensor(rng)]}).encode()
    pick = rng.randrange(6)
    if pick == 0:     # lines aiohttp's parser refuses
        return rng.choice([b"POST /v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                           b"POST /v2 HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                           b"POST /v2 HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
                           b"GET /v2 HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
                           b"G\x00T / HTTP/1.1\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                           b"POST /v2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"])
    if pick == 1:     # binary-header lengths
        length = rng.choice(["-1", "abc", str(10**20), str(len(good) + 1), "0", " 7", "1e3"])
        return body_request(rng, name, good, **{"Inference-Header-Content-Length": length})
    if pick == 2:     # binary data that does not match its declared size
        head = {"inputs": [{"name": "input", "datatype": rng.choice(["FP32", "INT8", "BYTES"]), "shape": [1, WIDTH],
                            "parameters": {"binary_data_size": rng.choice([WIDTH * 4, 3, -1, "x"])}}]}
        h = json.dumps(head).encode()
        return body_request(rng, name, h + os.urandom(rng.choice([0, 5, WIDTH * 4, WIDTH * 4 + 1])),
                            **{"Inference-Header-Content-Length": str(len(h))})
    if pick == 3:     # a body shorter than its Content-Length: the client leaves mid-body
        return CUT + (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(good) + 50}\r\n"
                      "Connection: close\r\n\r\n").encode() + good
    if pick == 4:
        return body_request(rng, name, good, **{"Content-Type": rng.choice(["text/plain", "\x7f", "a" * 500])})
    return body_request(rng, name, good, **{"Expect": "100-continue"})


def urls(rng: random.Random, name: str) -> bytes:
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    path = rng.choice([f"/v2/models/{name}x/infer", f"/v2/models/{name}/versions/2/infer", "/v2/models/../../etc/passwd",
                       "/v2/models/%00/infer", "/v2/models/%2e%2e/config", "/v2/" + "a" * 10_000,
                       f"/v2/models/{name}/infer?x=" + "%" * 50, "/v2/models/\u00e9/stats", "/", "/v3",
                       f"/v2/models/{name}/config", f"/v2/models/{name}/stats", "/v2/models/stats",
                       "/v2/repository/index", "/e3/policy", "/metrics", f"/v2/models/{name}/versions/x/stats"])
    body = rng.choice([b"", b"{", b'{"ready": 3}', b'{"threshold": "a"}', b'{"threshold": 1e400}', b"[]"])
    return http(method, path, body)


def generate(seed: int, count: int, name: str) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    makers = {"mutated": lambda: body_request(rng, name, mutated(rng)),
              "shapes": lambda: body_request(rng, name, shapes(rng)),
              "numbers": lambda: body_request(rng, name, numbers(rng)),
              "bad_json": lambda: bad_json(rng, name), "encodings": lambda: encodings(rng, name),
              "headers": lambda: headers(rng, name), "urls": lambda: urls(rng, name)}
    kinds = list(makers)
    return [(k, makers[k]()) for k in (kinds[i % len(kinds)] for i in range(count))]


# -- sending and judging ----------------------------------------------------------------------------

CUT = b"<cut>"      # marks a request whose client sends it and leaves without reading an answer


class Collect(asyncio.Protocol):
    """Everything the node sends until it closes, kept even when the close is a reset (the node
    may close on a client still sending, as it does after refusing a bomb)."""

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.data, self.closed, self.answered = bytearray(), loop.create_future(), loop.create_future()
        self.first_at = None

    def data_received(self, data: bytes) -> None:
        self.first_at = self.first_at or time.monotonic()
        self.data += data
        head, sep, body = bytes(self.data).partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if sep and length and len(body) >= int(length[1]) and not self.answered.done():
            self.answered.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def exchange(port: int, data: bytes, answered_in: list | None = None) -> bytes:
    """The node's whole answer to `data`, once the node closes; with `answered_in`, once the answer
    is complete (the seconds to its first byte are appended to it)."""
    transport, answer = await asyncio.get_running_loop().create_connection(Collect, "127.0.0.1", port)
    try:
        sent = time.monotonic()
        transport.write(data.removeprefix(CUT))
        if data.startswith(CUT):
            await asyncio.sleep(0.01)
            return b""
        await asyncio.wait_for(answer.closed if answered_in is None else answer.answered, 30)
        if answered_in is not None and answer.first_at:
            answered_in.append(answer.first_at - sent)
        return bytes(answer.data)
    finally:
        transport.close()


def no_constants(name):
    raise ValueError(f"{name} in a JSON body")


def verdict(raw: bytes) -> str | None:
    """What is wrong with an answer, or None."""
    if not raw:
        return "no answer"
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    if status >= 500:
        return f"status {status}: {body[:300]!r}"
    if status == 100:     # Expect: 100-continue; the answer follows
        return verdict(raw.partition(b"\r\n\r\n")[2])
    if status >= 400 or fields.get("content-type", "").startswith("application/json"):
        if "chunked" in fields.get("transfer-encoding", ""):
            return "chunked answer"
        try:
            answer = json.loads(body, parse_constant=no_constants)
        except ValueError as exc:
            return f"status {status}, body not JSON ({exc}): {body[:200]!r}"
        if status >= 400 and not (isinstance(answer, dict) and isinstance(answer.get("error"), str)):
            return f"status {status}, no error string: {body[:200]!r}"
    return None


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_a_thousand_malformed_requests_get_no_5xx_and_json_errors(node):
    url, name, _ = node
    port = int(url.rsplit(":", 1)[1])
    requests = generate(seed=15, count=1400, name=name)
    gate = asyncio.Semaphore(8)

    async def one(kind, data):
        async with gate:
            return kind, data, await exchange(port, data)

    answers = await asyncio.gather(*(one(k, d) for k, d in requests))
    wrong = [(k, d[:160], v) for k, d, raw in answers if not d.startswith(CUT) and (v := verdict(raw))]
    assert not wrong, wrong[:10]
    statuses = [int(raw.split(b" ", 2)[1]) for _, _, raw in answers if raw]
    assert len(statuses) >= 1300
    assert sum(400 <= s < 500 for s in statuses) >= 1000, sorted(set(statuses))
    # the node still answers a good request after all that
    good = json.dumps({"inputs": [valid_tensor(random.Random(0))]}).encode()
    assert b" 200 " in (await exchange(port, body_request(None, name, good))).split(b"\r\n", 1)[0]


async def test_a_non_finite_answer_is_an_error_naming_the_input(node):
    url, name, _ = node
    t = {"name": "input", "datatype": "FP32", "shape": [2, WIDTH], "data": [1.0] * WIDTH + [1.2e29] * WIDTH}
    raw = await exchange(int(url.rsplit(":", 1)[1]), body_request(None, name, {"inputs": [t]}))
    assert raw.startswith(b"HTTP/1.1 422"), raw[:300]
    assert "input 1 gives non-finite logits" in json.loads(raw.partition(b"\r\n\r\n")[2])["error"]


def gzip_bomb(mib: int = 1024) -> bytes:
    """A valid gzip member of `mib` MiB of zeros (about 1 MB for 1 GiB), built in about a second:
    one MiB compressed and fully flushed (so that it refers to nothing before it) is repeated."""
    zeros = bytes(1 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)     # an empty final block
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + block * mib + last + struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)


def test_the_bomb_is_what_it_claims():
    small = gzip_bomb(3)
    assert gzip.decompress(small) == bytes(3 << 20)


async def test_a_gzip_bomb_is_refused_with_413_in_bounded_memory(node):
    url, name, proc = node
    bomb = gzip_bomb()
    before, took, peak = rss_kb(proc.pid), [], []

    async def watch():
        while True:
            peak.append(rss_kb(proc.pid))
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(watch())
    try:
        raw = await exchange(int(url.rsplit(":", 1)[1]), body_request(None, name, bomb, **{"Content-Encoding": "gzip"}),
                             took)
        await asyncio.sleep(0.5)        # the node goes on reading what was sent until the connection ends
    finally:
        watcher.cancel()
    assert raw.startswith(b"HTTP/1.1 413"), raw[:300]
    assert "too large" in json.loads(raw.partition(b"\r\n\r\n")[2])["error"]
    # Bounded, not proportional: 1 GiB and 4 GiB bombs both peaked at +65..85 MB on the 2-core
    # test machine (aiohttp decompresses in capped steps under flow control; the body stops at 8 MiB).
    assert max(peak) - before < 128 * 1024, f"node RSS rose from {before} to {max(peak)} kB"
    assert took[0] < 2, f"the 413 came after {took[0]:.2f} s"
