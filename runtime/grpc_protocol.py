"""KServe v2 gRPC messages to and from the bodies the HTTP endpoint parses and renders.

The gRPC front end answers exactly as the HTTP one does because it goes through
the same two functions of v2_protocol.py: a ModelInferRequest becomes a body in
Triton's binary tensor form (a small JSON header, then the input's bytes), which
`v2_protocol.parse_request` checks and decodes like any HTTP request; and the
results are rendered by `v2_protocol.render_response` with every output in binary,
whose JSON header and tensor bytes become a ModelInferResponse with
`raw_output_contents` (tritonclient.grpc's default). Typed contents
(`contents.fp32_contents`, `int_contents`, ...) are packed into that same
little-endian byte form first; integers of narrow datatypes sent in the 32-bit
fields are range-checked here, since packing them would otherwise wrap.

Nothing here touches the event loop or the runtime.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from e3.models.base import ModelMeta

from . import v2_protocol as v2
from .proto import grpc_inference_pb2 as pb
from .v2_protocol import BadRequest

# The typed contents field of each datatype, and the little-endian numpy type its values
# are packed as. FP16 and BF16 have no typed field in the specification.
TYPED_FIELDS = {
    "BOOL": ("bool_contents", "?"),
    "INT8": ("int_contents", "i1"), "INT16": ("int_contents", "<i2"), "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "UINT8": ("uint_contents", "u1"), "UINT16": ("uint_contents", "<u2"), "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"),
    "FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8"),
    "BYTES": ("bytes_contents", None),
}
# What each typed field holds (proto3 int32 / uint32 / ...), read at full width so that a
# narrow datatype's range can be checked before packing.
SOURCE_TYPES = {"bool_contents": np.bool_, "int_contents": np.int64, "int64_contents": np.int64,
                "uint_contents": np.int64, "uint64_contents": np.uint64,
                "fp32_contents": np.float32, "fp64_contents": np.float64}
CONTENT_FIELDS = tuple(f.name for f in pb.InferTensorContents.DESCRIPTOR.fields)


def parse_infer(request: pb.ModelInferRequest, meta: ModelMeta) -> v2.InferRequest:
    """The request's inputs and outputs, checked as `v2_protocol.parse_request` checks an HTTP body."""
    if len(request.inputs) != 1:
        raise BadRequest(f"'inputs' must hold exactly one tensor, got {len(request.inputs)}")
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise BadRequest(f"raw_input_contents holds {len(raws)} entries for {len(request.inputs)} input")
    tensor = request.inputs[0]
    data = _input_bytes(tensor, raws[0] if raws else None)
    head = {"inputs": [{"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                        "parameters": {"binary_data_size": len(data)}}],
            # Every output in binary: the answer's tensors become raw_output_contents.
            "parameters": {"binary_data_output": True}}
    if request.id:
        head["id"] = request.id
    if request.outputs:
        head["outputs"] = [_requested_output(o) for o in request.outputs]
    text = json.dumps(head).encode()
    return v2.parse_request(text + data, str(len(text)), meta)


def _input_bytes(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> bytes:
    """The input's values in the byte form of Triton's binary tensor extension."""
    sent = [f for f in CONTENT_FIELDS if len(getattr(tensor.contents, f))]
    if raw is not None:
        if sent:
            raise BadRequest(f"inputs[0] has both raw_input_contents and contents.{sent[0]}; send one")
        return raw
    if not sent:
        field = TYPED_FIELDS.get(tensor.datatype, ("fp32_contents",))[0]
        raise BadRequest(f"inputs[0] carries no values: send them in raw_input_contents "
                         f"(tritonclient's default) or in contents.{field}")
    if tensor.datatype not in TYPED_FIELDS:
        raise BadRequest(f"inputs[0].datatype {_short(tensor.datatype)} has no typed contents field; "
                         "send its values in raw_input_contents")
    field, dtype = TYPED_FIELDS[tensor.datatype]
    if sent != [field]:
        raise BadRequest(f"inputs[0] is {tensor.datatype}: its values belong in contents.{field}, "
                         f"got contents.{', contents.'.join(sent)}")
    values = getattr(tensor.contents, field)
    if dtype is None:
        return b"".join(struct.pack("<I", len(b)) + b for b in values)
    expected = math.prod(tensor.shape)
    if tensor.shape and min(tensor.shape) >= 0 and len(values) != expected:   # a bad shape: v2's message
        raise BadRequest(f"inputs[0].shape {list(tensor.shape)} holds {expected} values but "
                         f"contents.{field} has {len(values)}")
    return _packed(values, field, dtype)


def _packed(values, field: str, dtype: str) -> bytes:
    wide = np.asarray(values, dtype=SOURCE_TYPES[field])
    target = np.dtype(dtype)
    if target.kind in "iu" and target.itemsize < wide.dtype.itemsize:
        info = np.iinfo(target)
        outside = np.flatnonzero((wide < info.min) | (wide > info.max))
        if outside.size:
            i = int(outside[0])
            raise BadRequest(f"contents.{field} value {i} is {int(wide[i])}, outside "
                             f"{target.name.upper()}'s range {info.min}..{info.max}")
    return wide.astype(target).tobytes()


def _requested_output(o: pb.ModelInferRequest.InferRequestedOutputTensor) -> dict:
    params = {k: parameter_value(v) for k, v in o.parameters.items()}
    params["binary_data"] = True
    return {"name": o.name, "parameters": params}


def parameter_value(p: pb.InferParameter) -> Any:
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def set_parameter(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def render_infer(call: v2.InferRequest, meta: ModelMeta, results, epoch: int) -> pb.ModelInferResponse:
    """The answer `v2_protocol.render_response` gives, as a ModelInferResponse."""
    body, headers = v2.render_response(call, meta, results, epoch)
    n = int(headers[v2.HEADER_LENGTH])
    head, at = json.loads(body[:n]), n
    response = pb.ModelInferResponse(model_name=head["model_name"], model_version=head["model_version"],
                                     id=head.get("id", ""))
    for key, value in head.get("parameters", {}).items():
        set_parameter(response.parameters[key], value)
    for t in head["outputs"]:
        size = t["parameters"]["binary_data_size"]
        response.outputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        response.raw_output_contents.append(body[at:at + size])
        at += size
    return response


def model_metadata(meta: ModelMeta) -> pb.ModelMetadataResponse:
    tensors = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta.name, versions=["1"], platform=f"e3-early-exit/{meta.family}",
        inputs=[tensors(**t) for t in v2.input_metadata(meta)],
        outputs=[tensors(**t) for t in v2.output_metadata(meta)])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
