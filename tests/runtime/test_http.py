"""The KServe v2 endpoint over real HTTP on 127.0.0.1 (in-process engine)."""
import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
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
