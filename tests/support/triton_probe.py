"""Drive a running node with the unchanged Triton HTTP client, as a Triton user would.

    python3 -m tests.support.triton_probe URL MODEL INPUTS.npy OUT.json

Runs in its own process because tritonclient.http rides on gevent, which has
no place in the test's asyncio loop. Writes what the client saw to OUT.json:
the health, metadata, repository index, model config and statistics calls
(statistics last, after every inference), the (label, exit_point) answers for the rows
of INPUTS.npy sent in binary (tritonclient's default) and as JSON, and the
client's error message for a request of the wrong shape.
"""
import json
import sys

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


def answers(client, model, x, binary: bool) -> list[list[int]]:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = None if binary else [triton.InferRequestedOutput(n, binary_data=False)
                                   for n in ("label", "exit_point", "label_name")]
    result = client.infer(model, [tensor], outputs=outputs)
    assert result.as_numpy("label_name").shape == (len(x),)
    return np.stack([result.as_numpy("label"), result.as_numpy("exit_point")], 1).tolist()


def main(url: str, model: str, inputs: str, out: str) -> None:
    x = np.load(inputs).astype(np.float32)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    seen = {"live": client.is_server_live(), "ready": client.is_model_ready(model),
            "metadata": client.get_model_metadata(model),
            "index": client.get_model_repository_index(), "config": client.get_model_config(model)}
    seen["binary"] = [a for i in range(0, len(x), 4) for a in answers(client, model, x[i:i + 4], True)]
    seen["json"] = [a for i in range(0, len(x), 4) for a in answers(client, model, x[i:i + 4], False)]
    try:
        answers(client, model, x[:2, :-1], True)
    except InferenceServerException as exc:
        seen["wrong_shape"] = exc.message()
    seen["stats"] = client.get_inference_statistics(model)
    seen["stats_v1"] = client.get_inference_statistics(model, "1")
    client.close()
    with open(out, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
