"""KServe v2 gRPC messages to and from what the HTTP endpoint parses and renders (no server)."""
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from e3.models.base import InputKind
from e3.runtime import grpc_protocol as gp
from e3.runtime.pipeline import Result
from e3.runtime.proto import grpc_inference_pb2 as pb
from e3.runtime.v2_protocol import BadRequest, parse_request
from tests.support.mlp import WIDTH, MLPModel

META = MLPModel().meta
ROWS = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH) / 7
PROTO = Path(__file__).resolve().parents[2] / "runtime" / "proto" / "grpc_inference.proto"


def request(datatype="FP32", shape=(2, WIDTH), raw=None, name="input", **contents):
    r = pb.ModelInferRequest(model_name="mlp", id="q1")
    r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    for field, values in contents.items():
        getattr(r.inputs[0].contents, field).extend(values)
    if raw is not None:
        r.raw_input_contents.append(raw)
    return r


def values(call):
    return np.array([list(x) for x in call.inputs])


def test_raw_and_typed_fp32_decode_to_the_inputs_an_http_binary_body_gives():
    raw = gp.parse_infer(request(raw=ROWS.tobytes()), META)
    typed = gp.parse_infer(request(fp32_contents=ROWS.ravel().tolist()), META)
    head = (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 8], '
            b'"parameters": {"binary_data_size": 64}}]}')
    http = parse_request(head + ROWS.tobytes(), str(len(head)), META)
    assert np.array_equal(values(raw), values(http)) and np.array_equal(values(typed), values(http))
    assert raw.id == "q1" and all(binary for _, binary in raw.outputs)


@pytest.mark.parametrize("datatype,field,data", [
    ("FP64", "fp64_contents", [0.25] * 16), ("INT64", "int64_contents", [-3] * 16),
    ("INT8", "int_contents", [-128, 127] * 8), ("UINT16", "uint_contents", [0, 65535] * 8),
    ("UINT64", "uint64_contents", [2**40] * 16)])
def test_each_typed_field_decodes_to_its_values(datatype, field, data):
    call = gp.parse_infer(request(datatype, **{field: data}), META)
    assert values(call).ravel().tolist() == [float(v) for v in data]


def test_text_inputs_decode_from_typed_and_raw_bytes():
    text = dataclasses.replace(META, input_kind=InputKind.TEXT)
    words = ["hello", "w\u00f6rld"]
    typed = gp.parse_infer(request("BYTES", (2,), name="text", bytes_contents=[w.encode() for w in words]), text)
    raw = b"".join(len(w.encode()).to_bytes(4, "little") + w.encode() for w in words)
    assert typed.inputs == gp.parse_infer(request("BYTES", (2,), raw=raw, name="text"), text).inputs == words
    with pytest.raises(BadRequest, match="BYTES element 0 is not UTF-8 text"):
        gp.parse_infer(request("BYTES", (1,), name="text", bytes_contents=[b"\xff"]), text)


@pytest.mark.parametrize("kwargs,message", [
    (dict(datatype="INT8", int_contents=[300] + [0] * 15), "int_contents value 0 is 300, outside INT8's range -128..127"),
    (dict(datatype="UINT8", uint_contents=[0] * 15 + [256]), "value 15 is 256, outside UINT8's range 0..255"),
    (dict(fp32_contents=[0.0] * 15), "inputs[0].shape [2, 8] holds 16 values but contents.fp32_contents has 15"),
    (dict(fp64_contents=[0.0] * 16), "its values belong in contents.fp32_contents, got contents.fp64_contents"),
    (dict(raw=ROWS.tobytes(), fp32_contents=[0.0] * 16), "both raw_input_contents and contents.fp32_contents"),
    (dict(), "carries no values: send them in raw_input_contents"),
    (dict(datatype="FP16", raw=b"\0" * 31), "FP16 of shape [2, 8]: 32 bytes expected, 31 sent"),
    (dict(datatype="FP16", fp32_contents=[0.0] * 16), "'FP16' has no typed contents field"),
    (dict(raw=ROWS.tobytes()[:-4]), "FP32 of shape [2, 8]: 64 bytes expected, 60 sent"),
    (dict(shape=(2, 7), raw=ROWS.tobytes()[:56]), "does not fit this model"),
    (dict(name="x", raw=ROWS.tobytes()), "inputs[0].name must be 'input'"),
    (dict(datatype="BYTES", bytes_contents=[b"a", b"b"], shape=(2,)), "must be numeric"),
    (dict(fp32_contents=[float("nan")] + [0.0] * 15), "inputs must be finite"),
])
def test_bad_requests_raise_bad_request_naming_the_problem(kwargs, message):
    with pytest.raises(BadRequest) as exc:
        gp.parse_infer(request(**kwargs), META)
    assert message in str(exc.value)


def test_input_counts_and_requested_outputs_are_checked():
    two = request(raw=ROWS.tobytes())
    two.raw_input_contents.append(b"")
    with pytest.raises(BadRequest, match="raw_input_contents holds 2 entries for 1 input"):
        gp.parse_infer(two, META)
    none = pb.ModelInferRequest(model_name="mlp")
    with pytest.raises(BadRequest, match="exactly one tensor, got 0"):
        gp.parse_infer(none, META)
    asked = request(raw=ROWS.tobytes())
    asked.outputs.add(name="label")
    asked.outputs.add(name="exit_point")
    assert gp.parse_infer(asked, META).outputs == (("label", True), ("exit_point", True))
    asked.outputs.add(name="label").parameters["classification"].int64_param = 2
    with pytest.raises(BadRequest, match="classification is not supported"):
        gp.parse_infer(asked, META)


def test_the_answer_is_raw_output_contents_with_the_exits_in_parameters():
    asked = request(raw=ROWS.tobytes())
    for name in ("label", "label_name", "exit_point", "logits"):
        asked.outputs.add(name=name)
    call = gp.parse_infer(asked, META)
    results = [Result(2, [0.5, 0.25, 0.25], 1, 1, 7), Result(0, [0.9, 0.05, 0.05], 5, 5, 7)]
    response = gp.render_infer(call, META, results, epoch=7)
    assert (response.model_name, response.model_version, response.id) == ("mlp", "1", "q1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("label", "INT64", [2]), ("label_name", "BYTES", [2]), ("exit_point", "INT64", [2]),
        ("logits", "FP32", [2, 3])]
    label, names, exits, logits = response.raw_output_contents
    assert np.frombuffer(label, "<i8").tolist() == [2, 0]
    assert names == b"\x01\x00\x00\x00c\x01\x00\x00\x00a"
    assert np.frombuffer(exits, "<i8").tolist() == [1, 5]
    assert np.frombuffer(logits, "<f4").tolist() == [0.5, 0.25, 0.25, np.float32(0.9), np.float32(0.05), np.float32(0.05)]
    params = {k: gp.parameter_value(v) for k, v in response.parameters.items()}
    assert params == {"exit_points": "1,5", "exit_blocks": "1,5", "epoch": 7}


def test_model_metadata_matches_the_http_metadata():
    m = gp.model_metadata(META)
    assert (m.name, list(m.versions), m.platform) == ("mlp", ["1"], "e3-early-exit/test")
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("input", "FP32", [-1, WIDTH])]
    assert [t.name for t in m.outputs] == ["logits", "label", "label_name", "exit_point", "exit_block"]


def fields(message) -> list[tuple]:
    return [(f.name, f.number, f.type, f.is_repeated,
             f.message_type.name if f.message_type else None) for f in message.fields]


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient[grpc] is not installed")
def test_every_message_and_method_matches_the_specification_as_tritonclient_has_it():
    """Same field names, numbers, types and nesting as Triton's grpc_service.proto, and the
    same methods; both modules load in one process (our messages are not `inference.*`)."""
    from tritonclient.grpc import service_pb2 as triton

    def same(ours, theirs):
        assert fields(ours) == fields(theirs), ours.full_name
        for nested in ours.nested_types:
            same(nested, theirs.nested_types_by_name[nested.name])
    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        same(message, triton.DESCRIPTOR.message_types_by_name[name])
    service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        theirs = service.methods_by_name[m.name]
        assert (m.input_type.name, m.output_type.name) == (theirs.input_type.name, theirs.output_type.name)
    wire = triton.ModelInferRequest(model_name="mlp", raw_input_contents=[b"x"])
    wire.inputs.add(name="input", datatype="FP32", shape=[1, 8]).contents.fp32_contents.append(1.5)
    ours = pb.ModelInferRequest.FromString(wire.SerializeToString())
    assert ours.inputs[0].contents.fp32_contents[0] == 1.5 and ours.raw_input_contents == [b"x"]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed")
def test_the_committed_gencode_is_the_proto_compiled(tmp_path):
    """An edit to grpc_inference.proto without regenerating its module fails here."""
    out = tmp_path / "set.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
                    f"--descriptor_set_out={out}", str(PROTO)], check=True, capture_output=True)
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    without_json_names(compiled.message_type)    # protoc's Python output leaves them out
    assert compiled == descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)


def without_json_names(messages) -> None:
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        without_json_names(m.nested_type)
