"""The KServe v2 gRPC endpoint over a real socket on 127.0.0.1 (in-process engine).

Clients: tritonclient.grpc.aio (Triton's own asyncio client, unchanged) and a plain
grpc.aio channel for what that client cannot send (typed contents, bad messages).
"""
import asyncio
import importlib.util
from pathlib import Path

import grpc
import numpy as np
import pytest

from e3.models.policies import make_policy
from e3.models.registry import LoadedModel
from e3.runtime.grpc_server import GrpcServer
from e3.runtime.proto import grpc_inference_pb2 as pb
from e3.runtime.runtime import Runtime
from tests.runtime.test_runtime_inline import INPUTS, config, reference
from tests.support.mlp import WIDTH, MLPModel

needs_triton = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                  reason="tritonclient[grpc] is not installed (it is in the test extra)")


class Served:
    """A runtime behind a GrpcServer on a free port, and a channel to it."""

    def __init__(self, **batching):
        cfg = config(batch=4, cuts=(1, 3), max_queue=8, **batching)
        cfg.server.max_body_bytes, cfg.server.max_inputs = 4096, 8
        self.rt = Runtime(cfg, model=LoadedModel(MLPModel(), make_policy("patience", 2), Path(".")))
        self.server = GrpcServer(self.rt, "127.0.0.1", 0)

    async def __aenter__(self):
        await self.rt.start()
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.server.address)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(grace_s=1)
        await self.rt.close()

    async def call(self, method: str, request, timeout=30):
        response_type = getattr(pb, type(request).__name__.replace("Request", "Response"))
        rpc = self.channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                       request_serializer=type(request).SerializeToString,
                                       response_deserializer=response_type.FromString)
        return await rpc(request, timeout=timeout)


@pytest.fixture
async def node():
    async with Served() as s:
        yield s


def infer_request(rows, **contents):
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="input", datatype="FP64", shape=[len(rows), WIDTH])
    if contents:
        for field, values in contents.items():
            getattr(r.inputs[0].contents, field).extend(values)
    else:
        r.raw_input_contents.append(np.array(rows, "<f8").tobytes())
    return r


def answers(response) -> list[tuple[int, int]]:
    out = {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents)}
    return list(zip(np.frombuffer(out["label"], "<i8").tolist(), np.frombuffer(out["exit_point"], "<i8").tolist()))


@needs_triton
async def test_triton_client_health_metadata_and_infer(node):
    import tritonclient.grpc.aio as triton
    client = triton.InferenceServerClient(node.server.address)
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("mlp")
        meta = await client.get_model_metadata("mlp", as_json=True)
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", str(WIDTH)]}]
        assert (await client.get_server_metadata()).name == "e3"
        x = np.array(INPUTS[:8], dtype=np.float32)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("mlp", [tensor], request_id="t1")
        labels, exits = result.as_numpy("label"), result.as_numpy("exit_point")
        assert result.as_numpy("logits").shape == (8, 3) and result.as_numpy("label_name").shape == (8,)
        response = result.get_response()
        assert response.id == "t1"
        assert response.parameters["exit_points"].string_param == ",".join(map(str, exits.tolist()))
        # FP32 on the wire: the reference runs in float64 on the float32-rounded inputs.
        assert len(labels) == 8 and set(exits.tolist()) <= set(range(6))
    finally:
        await client.close()


async def test_raw_and_typed_contents_give_the_reference_answers(node):
    expected = reference(("patience", 2), (1, 3))[:8]
    assert answers(await node.call("ModelInfer", infer_request(INPUTS[:8]))) == expected
    typed = infer_request(INPUTS[:8], fp64_contents=[v for row in INPUTS[:8] for v in row])
    assert answers(await node.call("ModelInfer", typed)) == expected


@pytest.mark.parametrize("method,request_,code,message", [
    ("ModelInfer", pb.ModelInferRequest(model_name="resnet"), grpc.StatusCode.NOT_FOUND, "unknown model 'resnet'"),
    ("ModelMetadata", pb.ModelMetadataRequest(name="mlp", version="2"), grpc.StatusCode.NOT_FOUND,
     "unknown version '2' of model 'mlp'"),
    ("ModelReady", pb.ModelReadyRequest(name="x"), grpc.StatusCode.NOT_FOUND, "unknown model 'x'"),
    ("ModelInfer", pb.ModelInferRequest(model_name="mlp"), grpc.StatusCode.INVALID_ARGUMENT, "exactly one tensor"),
    ("ModelInfer", infer_request(INPUTS[:9]), grpc.StatusCode.INVALID_ARGUMENT,
     "9 inputs in one request; the limit is 8"),
    ("ModelInfer", infer_request([[0.0] * 5]), grpc.StatusCode.INVALID_ARGUMENT, "FP64 of shape [1, 8]: 64 bytes"),
])
async def test_errors_are_statuses_naming_the_problem_and_the_node_keeps_serving(node, method, request_,
                                                                                  code, message):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await node.call(method, request_)
    assert exc.value.code() == code and message in exc.value.details()
    assert answers(await node.call("ModelInfer", infer_request(INPUTS[:1])))
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert node.rt.metrics.registry.get_sample_value("e3_bad_requests_total", {"status": "400"}) == 1


async def test_unimplemented_methods_and_oversized_messages_are_refused(node):
    """Oversized counts after decompression: a gzip bomb is refused like a large message."""
    config = node.channel.unary_unary("/inference.GRPCInferenceService/ModelConfig")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await config(b"", timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.aio.AioRpcError) as exc:      # 64 rows of FP64: 4 kB over max_body_bytes
        await node.call("ModelInfer", infer_request([[0.5] * WIDTH] * 64))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bomb = infer_request([[0.0] * WIDTH])
    bomb.raw_input_contents[0] = bytes(16 << 20)          # 16 MiB of zeros, 16 kB gzipped
    rpc = node.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await rpc(bomb, timeout=30, compression=grpc.Compression.Gzip)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert answers(await node.call("ModelInfer", infer_request(INPUTS[:1])))


async def test_overload_is_unavailable_with_retry_after():
    async with Served() as node:
        node.rt.pipelines[node.rt.epoch].admit = _refuse
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await node.call("ModelInfer", infer_request(INPUTS[:1]))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "queue full" in exc.value.details()
        assert ("retry-after", "1") in tuple(exc.value.trailing_metadata())


def _refuse(samples):
    from e3.runtime.errors import OverloadedError
    raise OverloadedError("admission queue full (test)")


async def test_the_client_deadline_bounds_the_call_and_admitted_inputs_are_still_answered(node):
    """A call whose deadline passes is DEADLINE_EXCEEDED; its inputs, admitted with that
    deadline as their timeout, are answered by the runtime all the same (and counted)."""
    real, seen = node.rt.infer, []

    async def slow_infer(inputs, timeout_s=None):
        seen.append(timeout_s)
        results = await real(inputs, timeout_s=timeout_s)
        await asyncio.sleep(0.5)          # the answer comes after the client's deadline
        return results
    node.rt.infer = slow_infer
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await node.call("ModelInfer", infer_request(INPUTS[:2]), timeout=0.3)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < seen[0] <= 0.3
    await asyncio.sleep(0.6)
    assert node.rt.metrics.registry.get_sample_value("e3_inputs_total", {"outcome": "answered"}) == 2
    node.rt.infer = real
    assert answers(await node.call("ModelInfer", infer_request(INPUTS[:1])))


async def test_a_taken_port_is_a_clear_error():
    async with Served() as node:
        taken = GrpcServer(node.rt, "127.0.0.1", node.server.port)
        with pytest.raises(Exception, match=f"cannot listen on 127.0.0.1:{node.server.port} for gRPC"):
            await taken.start()


@pytest.mark.parametrize("port,message", [
    (-1, "server.grpc_port must be in 0..65535 (0: off), got -1"), ("8001", "server.grpc_port must be an integer"),
    (8000, "server.grpc_port must differ from server.port, got 8000 for both")])
def test_grpc_port_is_validated(port, message):
    from e3.runtime.config import E3Config
    from e3.runtime.errors import ConfigError
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        E3Config.from_dict({"server": {"grpc_port": port}})


async def test_stop_lets_running_calls_finish_and_refuses_new_ones(node):
    """The node's shutdown stops gRPC before the runtime: calls in flight still get their answers."""
    real = node.rt.infer

    async def slow_infer(inputs, timeout_s=None):
        await asyncio.sleep(0.3)
        return await real(inputs, timeout_s=timeout_s)
    node.rt.infer = slow_infer
    calls = [asyncio.ensure_future(node.call("ModelInfer", infer_request(INPUTS[i:i + 1]))) for i in range(6)]
    await asyncio.sleep(0.1)
    await node.server.stop(grace_s=5)
    assert [answers(await c) for c in calls] == [[a] for a in reference(("patience", 2), (1, 3))[:6]]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await node.call("ModelInfer", infer_request(INPUTS[:1]), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
