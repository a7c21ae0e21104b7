"""Request parsing and response rendering of the v2 protocol, JSON and binary (no server)."""
import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from e3.models.base import InputKind
from e3.runtime.v2_protocol import (HEADER_LENGTH, OUTPUTS, BadRequest, parse_request,
                                    render_response)
from tests.support.mlp import WIDTH, MLPModel

META = MLPModel().meta
TEXT_META = dataclasses.replace(META, input_kind=InputKind.TEXT)


def binary_request(raw: bytes, shape, datatype="FP32", **extra):
    """A body as tritonclient.http sends it: a JSON header, then the tensor's bytes."""
    tensor = {"name": "text" if datatype == "BYTES" else "input", "shape": shape, "datatype": datatype,
              "parameters": {"binary_data_size": len(raw)}}
    head = json.dumps({"inputs": [tensor], **extra}).encode()
    return head + raw, str(len(head))


def json_request(body: dict) -> tuple[bytes, None]:
    return json.dumps(body).encode(), None


def strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


@dataclasses.dataclass
class FakeResult:
    logits: list
    label: int
    exit_point: int
    exit_block: int
    epoch: int = 3


RESULTS = [FakeResult([0.25, -1.5, 2.0], 2, 1, 1), FakeResult([1.0, 0.5, -0.125], 0, 5, 5)]


def test_binary_and_json_bodies_give_the_same_inputs():
    x = np.random.default_rng(0).standard_normal((3, WIDTH)).astype(np.float32)
    via_binary = parse_request(*binary_request(x.tobytes(), [3, WIDTH]), META)
    via_json = parse_request(*json_request({"inputs": [
        {"name": "input", "shape": [3, WIDTH], "datatype": "FP32", "data": x.tolist()}]}), META)
    assert np.array_equal(np.stack(via_binary.inputs), np.array(via_json.inputs))


@pytest.mark.parametrize("datatype", ["FP64", "FP32", "FP16", "BF16", "INT8", "INT16", "INT32",
                                      "INT64", "UINT8", "UINT16", "UINT32", "UINT64"])
def test_every_numeric_datatype_decodes_to_its_values(datatype):
    values = np.arange(2 * WIDTH, dtype=np.float64).reshape(2, WIDTH)  # exact in every type
    if datatype == "BF16":
        raw = torch.tensor(values, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    else:
        raw = values.astype(np.dtype(datatype.lower().replace("fp", "float"))).tobytes()
    got = parse_request(*binary_request(raw, [2, WIDTH], datatype), META).inputs
    assert np.array_equal(np.stack(got), values)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.just(WIDTH)),
              elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_fp32_binary_inputs_round_trip_bit_for_bit(x):
    got = np.stack(parse_request(*binary_request(x.tobytes(), list(x.shape)), META).inputs)
    assert np.array_equal(got.astype(np.float32), x)


def test_binary_text_inputs_decode_as_utf8():
    raw = strings("héllo".encode(), b"", b"fortune")
    got = parse_request(*binary_request(raw, [3], "BYTES"), TEXT_META).inputs
    assert got == ["héllo", "", "fortune"]


@pytest.mark.parametrize("raw,shape,message", [
    (strings(b"\xff\xfe"), [1], "BYTES element 0 is not UTF-8 text"),
    (strings(b"ab")[:-1], [1], "claims 2 bytes but 1 remain"),
    (strings(b"ab") + b"\x01\x00", [2], "element 1 is cut short"),
    (strings(b"a", b"b"), [3], "shape [3] but the binary data holds 2 elements"),
])
def test_broken_binary_text_is_named(raw, shape, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_request(*binary_request(raw, shape, "BYTES"), TEXT_META)


def test_broken_binary_bodies_are_named():
    raw, length = binary_request(np.zeros((1, WIDTH), np.float32).tobytes(), [1, WIDTH])
    cases = [
        ((raw, "abc"), "must be an integer in 1.."),
        ((raw, "0"), "must be an integer in 1.."),
        ((raw, str(len(raw) + 1)), "must be an integer in 1.."),
        ((raw[:-4], length), "binary_data_size is 32 but 28 bytes follow"),
        ((raw + b"\0" * 4, length), "binary_data_size is 32 but 36 bytes follow"),
        (binary_request(np.zeros(WIDTH, np.float32).tobytes(), [2, WIDTH]),
         "FP32 of shape [2, 8]: 64 bytes expected, 32 sent"),
        (binary_request(b"\0" * 32, [1, WIDTH], "BOOL"), "must be numeric"),
        (binary_request(np.full((1, WIDTH), np.nan, np.float32).tobytes(), [1, WIDTH]),
         "value 0 is nan: inputs must be finite"),
    ]
    for args, message in cases:
        with pytest.raises(BadRequest) as info:
            parse_request(*args, META)
        assert message in str(info.value), (args[1], str(info.value))


def test_json_and_binary_data_together_are_refused():
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32",
                                   "data": [0.0] * WIDTH, "parameters": {"binary_data_size": 4}}]})
    with pytest.raises(BadRequest, match="both 'data' and parameters.binary_data_size"):
        parse_request(head.encode() + b"\0" * 4, str(len(head)), META)
    with pytest.raises(BadRequest, match="4 bytes follow the JSON header but no input"):
        body = {"inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.0] * WIDTH}]}
        parse_request(json.dumps(body).encode() + b"\0" * 4, str(len(json.dumps(body))), META)


def test_requested_outputs_follow_the_request_and_triton_binary_rule():
    x = np.zeros((1, WIDTH), np.float32).tobytes()
    every = parse_request(*binary_request(x, [1, WIDTH], parameters={"binary_data_output": True}), META)
    assert every.outputs == tuple((name, True) for name in OUTPUTS)
    picked = parse_request(*binary_request(x, [1, WIDTH], outputs=[
        {"name": "exit_point"}, {"name": "label", "parameters": {"binary_data": True}}]), META)
    assert picked.outputs == (("exit_point", False), ("label", True))


@pytest.mark.parametrize("extra,message", [
    ({"outputs": [{"name": "probs"}]}, "outputs[0] names no output of this model: 'probs'"),
    ({"outputs": []}, "'outputs' must be a non-empty list"),
    ({"outputs": [{"name": "label", "parameters": {"classification": 2}}]}, "classification is not supported"),
    ({"outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}, "binary_data must be true or false"),
    ({"parameters": {"binary_data_output": "yes"}}, "binary_data_output must be true or false"),
    ({"parameters": [1]}, "'parameters' must be an object"),
])
def test_bad_output_requests_are_named(extra, message):
    with pytest.raises(BadRequest) as info:
        parse_request(*binary_request(np.zeros((1, WIDTH), np.float32).tobytes(), [1, WIDTH], **extra), META)
    assert message in str(info.value)


def decode(body: bytes, headers: dict) -> dict:
    """Output name -> numpy values, read back the way tritonclient's InferResult reads them."""
    n = int(headers.get(HEADER_LENGTH, len(body)))
    head, at, out = json.loads(body[:n]), n, {}
    for t in head["outputs"]:
        size = t.get("parameters", {}).get("binary_data_size")
        if size is None:
            out[t["name"]] = np.array(t["data"])
        elif t["datatype"] == "BYTES":
            chunk, at = body[at:at + size], at + size
            out[t["name"]] = np.array(_split_strings(chunk))
        else:
            chunk, at = body[at:at + size], at + size
            out[t["name"]] = np.frombuffer(chunk, np.dtype(t["datatype"].lower().replace("fp", "float")))
        out[t["name"]] = out[t["name"]].reshape(t["shape"])
    assert at == len(body)
    return out


def _split_strings(chunk: bytes) -> list[str]:
    items, at = [], 0
    while at < len(chunk):
        (k,) = struct.unpack_from("<I", chunk, at)
        items.append(chunk[at + 4:at + 4 + k].decode())
        at += 4 + k
    return items


def test_binary_and_json_responses_carry_the_same_values():
    x = np.zeros((2, WIDTH), np.float32).tobytes()
    as_json = parse_request(*binary_request(x, [2, WIDTH], id="q7"), META)
    as_binary = parse_request(*binary_request(x, [2, WIDTH], parameters={"binary_data_output": True}), META)
    body_j, headers_j = render_response(as_json, META, RESULTS, epoch=0)
    body_b, headers_b = render_response(as_binary, META, RESULTS, epoch=0)
    assert HEADER_LENGTH not in headers_j and json.loads(body_j)["id"] == "q7"
    assert headers_b["Content-Type"] == "application/octet-stream"
    plain, binary = decode(body_j, headers_j), decode(body_b, headers_b)
    assert plain.keys() == binary.keys() == OUTPUTS.keys()
    for name in OUTPUTS:
        assert plain[name].tolist() == binary[name].tolist(), name
    assert binary["label_name"].tolist() == ["c", "a"]
    assert json.loads(body_b[:int(headers_b[HEADER_LENGTH])])["parameters"]["exit_points"] == "1,5"


def numeric(values, datatype):
    return json_request({"inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": datatype,
                                     "data": list(values) + [0] * (WIDTH - len(values))}]})


@pytest.mark.parametrize("datatype,value,bounds", [
    ("INT8", 300, "-128..127"), ("INT8", -129, "-128..127"), ("UINT8", -1, "0..255"),
    ("INT16", 40000, "-32768..32767"), ("UINT32", 2**32, "0..4294967295"),
    ("INT64", 2**70, "..9223372036854775807"), ("INT64", 2**63, "..9223372036854775807"),
    ("UINT64", 2**64, "0..18446744073709551615"), ("UINT64", -1, "0.."),
    ("FP32", 1e39, "up to 3.4028235e+38"), ("FP16", 70000.0, "up to 65504"),
    ("BF16", -3.4e38, "up to 3.3895314e+38"),
])
def test_values_a_datatype_cannot_hold_are_refused_naming_value_and_type(datatype, value, bounds):
    with pytest.raises(BadRequest, match="value 0 is") as err:
        parse_request(*numeric([value], datatype), META)
    assert f"outside {datatype}'s range" in str(err.value) and bounds in str(err.value)


@pytest.mark.parametrize("datatype,values", [
    ("INT8", [-128, 127]), ("UINT8", [0, 255]), ("INT64", [2**63 - 1, -2**63]),
    ("UINT64", [2**64 - 1]), ("FP32", [3.4028234e38, -1e-45]), ("FP16", [65504.0]),
])
def test_values_at_a_datatypes_bounds_are_accepted(datatype, values):
    got = parse_request(*numeric(values, datatype), META).inputs
    assert got[0][:len(values)].tolist() == [float(v) for v in values]


def test_a_non_finite_answer_is_refused_naming_the_input():
    from e3.runtime.v2_protocol import NonFiniteOutput
    request = parse_request(*numeric([1.2e29] * WIDTH, "FP32"), META)
    request = dataclasses.replace(request, inputs=request.inputs * 2)
    results = [RESULTS[0], dataclasses.replace(RESULTS[1], logits=[float("nan"), 0.0, 1.0])]
    with pytest.raises(NonFiniteOutput, match=r"input 1 gives non-finite logits \(nan\).*1\.2e\+29") as err:
        render_response(request, META, results, 0)
    assert err.value.status == 422


def test_text_inputs_may_come_as_n_by_1_as_triton_clients_batch_strings():
    body = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}]}
    assert parse_request(*json_request(body), TEXT_META).inputs == ["a", "b"]
    assert parse_request(*binary_request(strings(b"a", b"b"), [2, 1], "BYTES"), TEXT_META).inputs == ["a", "b"]
