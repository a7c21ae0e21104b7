"""Drive a running node with the unchanged Triton gRPC client, as a Triton user would.

    python3 -m tests.support.triton_grpc_probe HOST:PORT MODEL INPUTS.npy OUT.json

The gRPC sibling of triton_probe.py, in its own process like it, so that the client
runs exactly as in a user's program. Writes what the client saw to OUT.json: the
health and metadata calls, the (label, exit_point) answers for the rows of
INPUTS.npy sent as raw_input_contents (tritonclient.grpc's default) and as typed
contents.fp32_contents (through Triton's own generated stub, since the client
always sends raw), the exit points in the response parameters, and the status
code and message of a request of the wrong shape and of one for an unknown model.
"""
import json
import sys

import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


def raw_answers(client, model, x) -> tuple[list[list[int]], str]:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    assert result.as_numpy("label_name").shape == (len(x),)
    exits = result.get_response().parameters["exit_points"].string_param
    return np.stack([result.as_numpy("label"), result.as_numpy("exit_point")], 1).tolist(), exits


def typed_answers(stub, model, x) -> list[list[int]]:
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="label")
    request.outputs.add(name="exit_point")
    response = stub.ModelInfer(request, timeout=60)
    label, exit_point = (np.frombuffer(raw, "<i8") for raw in response.raw_output_contents)
    return np.stack([label, exit_point], 1).tolist()


def refusal(call) -> list[str]:
    try:
        call()
    except InferenceServerException as exc:
        return [exc.status(), exc.message()]
    return ["no error", ""]


def main(address: str, model: str, inputs: str, out: str) -> None:
    x = np.load(inputs).astype(np.float32)
    client = triton.InferenceServerClient(address)
    seen = {"live": client.is_server_live(), "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(model),
            "metadata": client.get_model_metadata(model, as_json=True),
            "server": client.get_server_metadata(as_json=True)}
    batches = [raw_answers(client, model, x[i:i + 4]) for i in range(0, len(x), 4)]
    seen["raw"] = [a for answers, _ in batches for a in answers]
    seen["exit_points"] = ",".join(exits for _, exits in batches)
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        seen["typed"] = [a for i in range(0, len(x), 4) for a in typed_answers(stub, model, x[i:i + 4])]
    seen["wrong_shape"] = refusal(lambda: raw_answers(client, model, x[:2, :-1]))
    seen["unknown_model"] = refusal(lambda: raw_answers(client, "no-such-model", x[:1]))
    seen["model_config"] = refusal(lambda: client.get_model_config(model))
    client.close()
    with open(out, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
