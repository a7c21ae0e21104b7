"""The KServe v2 endpoint over real HTTP on 127.0.0.1 (in-process engine)."""
import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from e3.models.policies import make_policy
from e3.models.registry import LoadedModel
from e3.runtime.http import make_app
from e3.runtime.runtime import Runtime
from e3.runtime.v2_protocol import HEADER_LENGTH
from tests.runtime.test_runtime_inline import INPUTS, config, reference
from tests.support.mlp import WIDTH, MLPModel


@pytest.fixture
async def client():
    cfg = config(batch=4, cuts=(1, 3), max_queue=8)
    cfg.server.max_body_bytes, cfg.server.max_inputs = 4096, 8
    rt = Runtime(cfg, model=LoadedModel(MLPModel(), make_policy("patience", 2), Path(".")))
    await rt.start()
    async with TestClient(TestServer(make_app(rt), host="127.0.0.1")) as c:
        yield c
    await rt.close()


def body(rows, datatype="FP32", shape=None):
    return {"id": "r1", "inputs": [{"name": "input", "datatype": datatype,
                                    "shape": shape or [len(rows), WIDTH], "data": rows}]}


async def test_health_and_metadata(client):
    assert (await (await client.get("/v2/health/live")).json()) == {"live": True}
    assert (await client.get("/v2/health/ready")).status == 200
    meta = await (await client.get("/v2/models/mlp")).json()
    assert meta["inputs"][0]["shape"] == [-1, WIDTH]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "label", "label_name", "exit_point", "exit_block"]
    assert "binary_tensor_data" in (await (await client.get("/v2")).json())["extensions"]
    assert meta["parameters"]["e3"]["ramp_blocks"] == [0, 1, 2, 3, 4]
    assert (await client.get("/v2/models/mlp/ready")).status == 200


async def test_infer_returns_the_reference_answers_and_exit_points(client):
    resp = await client.post("/v2/models/mlp/infer", json=body(INPUTS[:8]))
    assert resp.status == 200
    out = await resp.json()
    assert out["id"] == "r1" and out["model_name"] == "mlp"
    tensors = {t["name"]: t for t in out["outputs"]}
    got = list(zip(tensors["label"]["data"], tensors["exit_point"]["data"]))
    assert got == reference(("patience", 2), (1, 3))[:8]
    assert out["parameters"]["exit_points"] == ",".join(str(e) for _, e in got)
    assert tensors["logits"]["shape"] == [8, 3] and len(tensors["logits"]["data"]) == 24


async def test_triton_binary_bodies_give_the_reference_answers(client):
    """Binary FP64 inputs in, binary outputs back: tritonclient.http's default form."""
    x = np.array(INPUTS[:8], dtype="<f8")
    head = json.dumps({"inputs": [{"name": "input", "shape": [8, WIDTH], "datatype": "FP64",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                                   {"name": "exit_point"}]}).encode()
    resp = await client.post("/v2/models/mlp/infer", data=head + x.tobytes(),
                             headers={HEADER_LENGTH: str(len(head))})
    assert resp.status == 200
    raw = await resp.read()
    n = int(resp.headers[HEADER_LENGTH])
    label_t, exit_t = json.loads(raw[:n])["outputs"]
    labels = np.frombuffer(raw[n:], "<i8")
    assert label_t["parameters"]["binary_data_size"] == len(raw) - n == 64
    assert list(zip(labels.tolist(), exit_t["data"])) == reference(("patience", 2), (1, 3))[:8]


async def test_broken_binary_body_is_400_and_the_node_keeps_serving(client):
    resp = await client.post("/v2/models/mlp/infer", data=b'{"inputs": []}', headers={HEADER_LENGTH: "99"})
    assert resp.status == 400 and "must be an integer in 1..14" in (await resp.json())["error"]
    assert (await client.post("/v2/models/mlp/infer", json=body(INPUTS[:1]))).status == 200


async def test_large_bodies_are_parsed_off_the_loop_with_the_same_answers(client, monkeypatch):
    from e3.runtime import http
    monkeypatch.setattr(http, "PARSE_INLINE_BYTES", 0)     # every body counts as large here
    resp = await client.post("/v2/models/mlp/infer", json=body(INPUTS[:8]))
    tensors = {t["name"]: t["data"] for t in (await resp.json())["outputs"]}
    assert list(zip(tensors["label"], tensors["exit_point"])) == reference(("patience", 2), (1, 3))[:8]
    bad = await client.post("/v2/models/mlp/infer", data=b"{")
    assert bad.status == 400 and "not valid JSON" in (await bad.json())["error"]


async def test_nested_data_is_accepted(client):
    resp = await client.post("/v2/models/mlp/infer", json=body([INPUTS[0]]))
    assert resp.status == 200


@pytest.mark.parametrize("payload,status,message", [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"inputs": []}), 400, "exactly one tensor"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32"}]}), 400, "lacks 'data'"),
    (json.dumps(body([[0.0] * 5], shape=[1, 5])), 400, "does not fit this model: expected [n, 8]"),
    (json.dumps(body([[0.0] * 8], shape=[2, 8])), 400, "holds 16 values but data has 8"),
    (json.dumps(body([[0.0] * 8], datatype="BYTES")), 400, "must be numeric"),
    (json.dumps(body([["a"] * 8])), 400, "must be JSON numbers"),
    ('{"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [NaN,0,0,0,0,0,0,0]}]}',
     400, "NaN is not a JSON number"),
    pytest.param("[" * 1500 + "]" * 1500, 400, "nested too deeply", id="deep-nesting"),
    (json.dumps({"inputs": [{**body([[0.0] * 8])["inputs"][0], "name": "x"}]}), 400,
     "inputs[0].name must be 'input'"),
    (json.dumps(body([[0.5] * 8], datatype="INT64")), 400, "INT64 data must be JSON integers"),
    ('{"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0,1e400,0,0,0,0,0,0]}]}',
     400, "inputs[0] value 1 is inf: inputs must be finite"),
    (json.dumps(body([[10**400] + [0] * 7])), 400, "beyond float64's range"),
])
async def test_bad_requests_get_a_400_naming_the_problem(client, payload, status, message):
    resp = await client.post("/v2/models/mlp/infer", data=payload, headers={"Content-Type": "application/json"})
    assert resp.status == status
    assert message in (await resp.json())["error"]
    assert (await client.post("/v2/models/mlp/infer", json=body(INPUTS[:1]))).status == 200


async def test_unknown_model_route_and_method_are_json_errors(client):
    resp = await client.post("/v2/models/resnet/infer", json=body(INPUTS[:1]))
    assert resp.status == 404 and "unknown model 'resnet'" in (await resp.json())["error"]
    assert (await client.get("/v2/nothing")).status == 404
    resp = await client.get("/v2/models/mlp/infer")
    assert resp.status == 405 and "error" in await resp.json()


async def test_too_many_inputs_is_400(client):
    resp = await client.post("/v2/models/mlp/infer", json=body(INPUTS[:9]))
    assert resp.status == 400 and "9 inputs in one request; the limit is 8" in (await resp.json())["error"]


async def test_oversized_body_is_413(client):
    resp = await client.post("/v2/models/mlp/infer", json=body([[0.5] * WIDTH] * 200))
    assert resp.status == 413
    assert "too large (limit 4096 bytes)" in (await resp.json())["error"]


async def test_overload_is_503_with_retry_after():
    """Deterministic overload: batches of 64 can never fill an 8-row queue, so rows wait for
    their SLO flush, and a third request of 4 inputs finds the queue full."""
    cfg = config(batch=64, cuts=(1, 3), max_queue=8, slo_ms=400, work_conserving=False)
    cfg.server.max_inputs = 4
    rt = Runtime(cfg, model=LoadedModel(MLPModel(), make_policy("patience", 2), Path(".")))
    await rt.start()
    try:
        async with TestClient(TestServer(make_app(rt), host="127.0.0.1")) as c:
            first = [asyncio.ensure_future(c.post("/v2/models/mlp/infer", json=body(INPUTS[i:i + 4])))
                     for i in (0, 4)]
            while len(rt.pipelines[rt.epoch].stages[0].queue) < 8:
                await asyncio.sleep(0.005)
            refused = await c.post("/v2/models/mlp/infer", json=body(INPUTS[8:12]))
            assert refused.status == 503 and refused.headers["Retry-After"] == "1"
            assert "admission queue full (8 of 8 rows waiting)" in (await refused.json())["error"]
            assert [r.status for r in await asyncio.gather(*first)] == [200, 200]
    finally:
        await rt.close()


async def test_metrics_and_plan_views(client):
    assert (await client.post("/v2/models/mlp/infer", json=body(INPUTS[:7]))).status == 200
    assert (await client.post("/v2/models/mlp/infer", data=b"{")).status == 400
    text = await (await client.get("/metrics")).text()
    assert 'e3_bad_requests_total{status="400"} 1.0' in text
    assert 'e3_queue_seconds_count{split="0"} 7.0' in text
    assert 'e3_inputs_total{outcome="answered"} 7.0' in text
    assert "e3_exits_total" in text and "e3_plan_epoch 0.0" in text
    plan = await (await client.get("/e3/plan")).json()
    assert plan["placement"]["splits"] == [[0, 1], [2, 3], [4, 5]]


async def test_policy_endpoint_validates(client):
    resp = await client.post("/e3/policy", json={"threshold": 3})
    assert resp.status == 200 and (await resp.json())["threshold"] == 3
    resp = await client.post("/e3/policy", json={"threshold": 0})
    assert resp.status == 400 and "patience threshold must lie in" in (await resp.json())["error"]
    resp = await client.post("/e3/policy", json={"name": "entropy", "threshold": 0.3})
    assert resp.status == 409 and "switching needs a restart" in (await resp.json())["error"]
    assert "Retry-After" not in resp.headers


# -- what arrives malformed below the JSON: encodings, aiohttp's parser, clients that leave ---------

@pytest.fixture
async def node():
    """The app behind NodeRunner on a real socket, as bin/e3-node serves it, and its port."""
    from aiohttp import web
    from e3.runtime.http import NodeRunner
    cfg = config(batch=4, cuts=(1, 3), max_queue=8)
    rt = Runtime(cfg, model=LoadedModel(MLPModel(), make_policy("patience", 2), Path(".")))
    await rt.start()
    runner = NodeRunner(make_app(rt))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1]
    await runner.cleanup()
    await rt.close()


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read to the end: (status, headers, body) of the one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, payload


def post(payload: bytes, path="/v2/models/mlp/infer", **headers) -> bytes:
    fields = {"Host": "127.0.0.1", "Content-Length": str(len(payload)), "Connection": "close", **headers}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
            + "\r\n").encode() + payload


GOOD = json.dumps(body(INPUTS[:1])).encode()


@pytest.mark.parametrize("coding,payload,status,message", [
    ("gzip", GOOD, 400, "not valid gzip data: Error -3"),
    ("deflate", b"garbage!" * 8, 400, "not valid deflate data"),
    ("br", b"garbage!" * 8, 400, "not valid br data"),
    ("compress", GOOD, 415, "Content-Encoding 'compress' is not supported"),
    ("gzip, br", GOOD, 415, "is not supported"),
])
async def test_a_body_that_cannot_be_decoded_is_a_json_4xx(node, coding, payload, status, message):
    got, headers, answer = await exchange(node, post(payload, **{"Content-Encoding": coding}))
    assert (got, headers["content-type"].split(";")[0]) == (status, "application/json")
    assert message in json.loads(answer)["error"]


async def test_gzip_and_zstd_bodies(node):
    import gzip
    status, _, answer = await exchange(node, post(gzip.compress(GOOD), **{"Content-Encoding": "gzip"}))
    assert status == 200 and json.loads(answer)["outputs"]
    # zstd is decoded where backports.zstd is installed; elsewhere aiohttp's parser refuses it
    status, _, answer = await exchange(node, post(b"not zstd", **{"Content-Encoding": "zstd"}))
    assert status in (400, 415) and "zstd" in json.loads(answer)["error"]


@pytest.mark.parametrize("request_bytes,message", [
    (post(GOOD, path="/v2/" + "a" * 10_000), "Got more than 8190 bytes"),
    (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", "Invalid header token"),
    (b"F@O / HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid method"),
    (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", "Got more than 8190 bytes"),
])
async def test_what_aiohttps_parser_refuses_is_answered_in_json(node, request_bytes, message):
    status, headers, answer = await exchange(node, request_bytes)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert message in json.loads(answer)["error"]
    ok, _, _ = await exchange(node, post(GOOD))
    assert ok == 200


async def test_a_client_that_leaves_mid_body_is_one_log_line(node, caplog):
    caplog.set_level("INFO")
    reader, writer = await asyncio.open_connection("127.0.0.1", node)
    writer.write(post(GOOD)[:-40])        # the headers announce 40 bytes more than come
    await writer.drain()
    writer.close()
    for _ in range(200):
        if any("disconnected before the end of its request body" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    mine = [r for r in caplog.records if r.name.startswith(("e3", "aiohttp.server"))]
    assert [r.levelname for r in mine if "disconnected" in r.getMessage()] == ["INFO"]
    assert not [r for r in mine if r.levelno >= 30], [r.getMessage() for r in mine]
    assert (await exchange(node, post(GOOD)))[0] == 200


async def test_an_input_that_overflows_the_model_is_422_naming_it(client):
    rows = [INPUTS[0], [1.5e308] * WIDTH]          # finite FP64 values whose products overflow
    resp = await client.post("/v2/models/mlp/infer", json=body(rows, datatype="FP64"))
    text = await resp.text()
    assert resp.status == 422 and "NaN" not in text.replace("(nan)", "")
    assert "input 1 gives non-finite logits" in json.loads(text)["error"]


# -- Triton's extensions: repository index, model configuration, statistics ------------------------

async def test_repository_index_as_triton_serves_it(client):
    expected = [{"name": "mlp", "version": "1", "state": "READY", "reason": ""}]
    assert await (await client.post("/v2/repository/index", data=b"")).json() == expected
    assert await (await client.post("/v2/repository/index", json={"ready": True})).json() == expected
    assert await (await client.get("/v2/repository/index")).json() == expected
    bad = await client.post("/v2/repository/index", json={"ready": "yes"})
    assert bad.status == 400 and "'ready' must be true or false" in (await bad.json())["error"]
    extensions = (await (await client.get("/v2")).json())["extensions"]
    assert {"model_repository", "model_configuration", "statistics"} <= set(extensions)


async def test_model_config_in_tritons_shape(client):
    for path in ("/v2/models/mlp/config", "/v2/models/mlp/versions/1/config"):
        config = await (await client.get(path)).json()
        assert config["name"] == "mlp" and config["max_batch_size"] == 8
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [WIDTH]}]
        outputs = {o["name"]: o for o in config["output"]}
        assert outputs["logits"] == {"name": "logits", "data_type": "TYPE_FP32", "dims": [3]}
        assert outputs["label_name"]["data_type"] == "TYPE_STRING"
        assert outputs["label"] == {"name": "label", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}
        assert config["dynamic_batching"]["preferred_batch_size"] == [4]
        assert config["instance_group"][0]["kind"] == "KIND_CPU"
        assert json.loads(config["parameters"]["e3"]["string_value"])["ramp_blocks"] == [0, 1, 2, 3, 4]
    missing = await client.get("/v2/models/other/config")
    assert missing.status == 404 and "unknown model 'other'" in (await missing.json())["error"]
    assert (await client.get("/v2/models/mlp/versions/2/config")).status == 404


async def test_statistics_count_what_the_runtime_did(client):
    assert (await client.post("/v2/models/mlp/infer", json=body(INPUTS[:6]))).status == 200
    assert (await client.post("/v2/models/mlp/infer", json=body(INPUTS[:2]))).status == 200
    for path in ("/v2/models/mlp/stats", "/v2/models/mlp/versions/1/stats", "/v2/models/stats"):
        (stat,) = (await (await client.get(path)).json())["model_stats"]
        assert (stat["name"], stat["version"], stat["inference_count"]) == ("mlp", "1", 8)
        inf = stat["inference_stats"]
        assert inf["success"]["count"] == 8 and inf["success"]["ns"] > 0 and inf["fail"]["count"] == 0
        assert inf["compute_infer"]["count"] == 8 and inf["compute_infer"]["ns"] > 0
        assert inf["queue"]["count"] == 8
        batches = stat["batch_stats"]
        assert sum(b["compute_infer"]["count"] for b in batches) == stat["execution_count"] >= 3
        assert all(1 <= b["batch_size"] <= 4 for b in batches)
        assert stat["last_inference"] > 1.7e12        # ms since the epoch
    assert (await client.get("/v2/models/nope/stats")).status == 404


async def test_a_request_refused_before_its_body_is_read_has_its_connection_closed():
    """A refusal that never reads the body answers 503 and closes the connection within the
    lingering second (aiohttp's default kept it 10 s waiting for a body the client never sent)."""
    from e3.runtime.listener import LINGERING_S, make_runner
    cfg = config(batch=4, cuts=(1, 3), max_queue=8)
    cfg.server.max_inflight_requests, cfg.server.adaptive_limit = 1, False
    rt = Runtime(cfg, model=LoadedModel(MLPModel(), make_policy("patience", 2), Path(".")))
    await rt.start()
    runner = make_runner(make_app(rt), cfg.server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        head = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        _, holder = await asyncio.open_connection("127.0.0.1", port)
        holder.write(head + b"{")                       # the one request in flight, its body half sent
        await holder.drain()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)                              # headers only: it is refused before its body
        await writer.drain()
        start = asyncio.get_running_loop().time()
        answer = await asyncio.wait_for(reader.read(), 3 * LINGERING_S)    # to EOF: the node closed it
        assert asyncio.get_running_loop().time() - start < 2 * LINGERING_S
        assert answer.startswith(b"HTTP/1.1 503") and b"Connection: close" in answer, answer
        assert b"limit 1, server.max_inflight_requests" in answer
        writer.close()
        holder.close()
    finally:
        await runner.cleanup()
        await rt.close()
