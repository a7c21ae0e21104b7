"""End to end over KServe v2 gRPC: worker processes, real sockets, the real default model,
and the unchanged tritonclient.grpc in its own process (tests/support/triton_grpc_probe.py)."""
import asyncio
import importlib.util
import json
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from e3.models.registry import load_model
from e3.runtime.examples import load_examples
from e3.runtime.grpc_server import GrpcServer
from e3.runtime.proto import grpc_inference_pb2 as pb
from e3.runtime.runtime import Runtime
from tests.e2e.test_cli import _leftovers, _node
from tests.e2e.test_node_processes import assert_like_reference, process_config
from tests.support.procs import stop_node

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None,
    reason="tritonclient[grpc] is not installed (it is in the test extra)")]
ROOT = Path(__file__).resolve().parents[2]


async def test_an_unchanged_triton_grpc_client_gets_the_reference_answers(default_dir, tmp_path):
    """Health, metadata, raw and typed contents against the reference forward, and errors."""
    inputs, _ = load_examples(default_dir, 40)
    loaded = load_model(default_dir)
    cuts = [loaded.model.meta.ramp_blocks[0], loaded.model.meta.ramp_blocks[-1]]
    np.save(tmp_path / "x.npy", np.array(inputs, dtype=np.float32))
    rt = Runtime(process_config(default_dir, cuts))
    server = GrpcServer(rt, "127.0.0.1", 0)
    await rt.start()
    try:
        await server.start()
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.triton_grpc_probe", server.address, rt.meta.name,
            str(tmp_path / "x.npy"), str(tmp_path / "seen.json"), stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        _, err = await asyncio.wait_for(probe.communicate(), 120)
        assert probe.returncode == 0, err.decode()
    finally:
        await server.stop()
        await rt.close()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["metadata"]["name"] == rt.meta.name and seen["server"]["name"] == "e3"
    assert seen["metadata"]["inputs"][0]["datatype"] == "FP32"
    for form in ("raw", "typed"):
        assert_like_reference(loaded, cuts, inputs, [tuple(a) for a in seen[form]])
    assert seen["exit_points"] == ",".join(str(e) for _, e in seen["raw"])
    assert seen["wrong_shape"][0] == "StatusCode.INVALID_ARGUMENT" and "does not fit this model" in seen["wrong_shape"][1]
    assert seen["unknown_model"][0] == "StatusCode.NOT_FOUND" and "no-such-model" in seen["unknown_model"][1]
    assert seen["model_config"][0] == "StatusCode.UNIMPLEMENTED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(default_dir) -> dict:
    return {**os.environ, "E3_CACHE": str(Path(default_dir).parents[1])}


def test_e3_node_serves_grpc_on_its_port_and_stops_it_on_sigterm(default_dir):
    port = free_port()
    proc = _node(["--model", "digits", "--port", "0", "--grpc-port", str(port), "--workers", "1", "--no-replan",
                  "--no-demo-query"], node_env(default_dir))
    try:
        lines = []
        while not lines or "Ctrl-C stops it" not in lines[-1]:
            line = proc.stdout.readline()
            assert line, "".join(lines) + proc.stderr.read()
            lines.append(line)
        serving = next(line for line in lines if "serving model" in line)
        assert f" and gRPC 127.0.0.1:{port} " in serving, serving
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady",
                                        request_serializer=pb.ServerReadyRequest.SerializeToString,
                                        response_deserializer=pb.ServerReadyResponse.FromString)
            assert ready(pb.ServerReadyRequest(), timeout=10).ready
    finally:
        out, err = stop_node(proc, signal.SIGTERM, 60)
    assert proc.returncode == 0, out + err
    assert "stopped" in out and "Traceback" not in out + err
    assert _leftovers(proc.pid) == ([], [])
    with socket.socket() as s:       # the port is released: nothing listens on it
        # SO_REUSEADDR: a connection the node closed may sit in TIME_WAIT on the port for a minute,
        # which a plain bind counts as in use; with it, bind fails only while a socket listens there.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
