"""Bodies of the KServe v2 / Open Inference Protocol infer call: requests in, responses out.

Two body forms, both as Triton and KServe clients send them:

- JSON: every tensor's values in its "data" list.
- Triton's binary tensor data extension, the default of `tritonclient.http`: the
  body is a JSON header of `Inference-Header-Content-Length` bytes followed by
  the raw tensors back to back, in input order, each sized by its
  `parameters.binary_data_size`. Numbers are little-endian; a BYTES tensor is,
  per element, a 4-byte little-endian length and then the bytes.

An output is answered in binary when its entry in the request's "outputs" says
`parameters.binary_data`, or, where it says nothing, when the request's
`parameters.binary_data_output` is true (Triton's rule; a request that names
no outputs gets them all). Nothing here touches the event loop or the runtime:
the HTTP handler reads the body, calls `parse_request`, runs the inputs and
calls `render_response`.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from e3.models.base import InputKind, ModelMeta

HEADER_LENGTH = "Inference-Header-Content-Length"

# Little-endian numpy types of the v2 numeric datatypes. BF16 has none: it is
# widened by hand (the top 16 bits of an FP32).
NUMPY_TYPES = {
    "FP64": "<f8", "FP32": "<f4", "FP16": "<f2", "BF16": "<u2",
    "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
}


class BadRequest(ValueError):
    """Raised while parsing a request that breaks the protocol; answered with `status` (400)."""
    status = 400


class NonFiniteOutput(BadRequest):
    """A well-formed input whose answer is not a finite number (its values overflow the model's
    arithmetic); answered 422, as JSON has no NaN or Infinity to carry such an answer."""
    status = 422


def _finite_limit(numpy_type: str) -> float:
    return float(np.finfo(numpy_type).max)


# The values each v2 datatype can hold: integers by their exact bounds, floats by their largest
# finite magnitude (BF16 keeps FP32's exponent, so its largest finite value is FP32's rounded down
# to an 8-bit mantissa).
RANGES: dict[str, tuple[float, float]] = {
    **{dt: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for dt, t in NUMPY_TYPES.items() if "INT" in dt},
    **{dt: (-_finite_limit(NUMPY_TYPES[dt]), _finite_limit(NUMPY_TYPES[dt])) for dt in ("FP64", "FP32", "FP16")},
    "BF16": (-3.3895313892515355e38, 3.3895313892515355e38),
}


@dataclass(frozen=True)
class Output:
    """One output tensor the endpoint can return: its v2 datatype and its flat values."""
    name: str
    datatype: str
    values: Callable[[Sequence[Any], ModelMeta], list]
    per_sample: Callable[[ModelMeta], list[int]] = lambda meta: []


OUTPUTS = {o.name: o for o in (
    Output("logits", "FP32", lambda rs, m: [v for r in rs for v in r.logits], lambda m: [m.num_classes]),
    Output("label", "INT64", lambda rs, m: [r.label for r in rs]),
    Output("label_name", "BYTES", lambda rs, m: [m.labels[r.label] for r in rs]),
    Output("exit_point", "INT64", lambda rs, m: [r.exit_point for r in rs]),
    Output("exit_block", "INT64", lambda rs, m: [r.exit_block for r in rs]),
)}


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer call: the per-sample inputs for `Model.encode` and what to answer."""
    id: str | None
    inputs: list
    outputs: tuple[tuple[str, bool], ...]  # (output name, answer in binary), in answer order


def input_metadata(meta: ModelMeta) -> list[dict]:
    if meta.input_kind == InputKind.TEXT:
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    return [{"name": "input", "datatype": "FP32", "shape": [-1, *meta.input_shape]}]


def output_metadata(meta: ModelMeta) -> list[dict]:
    return [{"name": o.name, "datatype": o.datatype, "shape": [-1, *o.per_sample(meta)]}
            for o in OUTPUTS.values()]


# -- requests ------------------------------------------------------------------------------

def parse_request(raw: bytes, header_length: str | None, meta: ModelMeta) -> InferRequest:
    """The request in `raw` (with the value of its Inference-Header-Content-Length header, if any)."""
    head, tail = _split_body(raw, header_length)
    body = strict_json(head)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    tensor = _only_input(body)
    expected = input_metadata(meta)[0]["name"]
    if tensor["name"] != expected:
        raise BadRequest(f"inputs[0].name must be {expected!r} (see the model's metadata), "
                         f"got {_short(tensor['name'])}")
    data = _tensor_data(tensor, tail)
    inputs = (_text_inputs(tensor, data) if meta.input_kind == InputKind.TEXT
              else _numeric_inputs(tensor, data, meta.input_shape))
    return InferRequest(body["id"] if isinstance(body.get("id"), str) else None, inputs,
                        _requested_outputs(body))


def _split_body(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return raw, b""
    if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(raw):
        raise BadRequest(f"{HEADER_LENGTH} must be an integer in 1..{len(raw)} (the body's "
                         f"length), got {header_length!r}")
    n = int(header_length)
    return raw[:n], raw[n:]


def strict_json(head: bytes) -> Any:
    """The JSON value in `head`; NaN and Infinity are refused, as JSON has no such numbers."""
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")
    try:
        return json.loads(head.decode("utf-8"), parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply") from None


def _only_input(body: dict) -> dict:
    tensors = body.get("inputs")
    if not isinstance(tensors, list) or len(tensors) != 1:
        raise BadRequest(f"'inputs' must be a list holding exactly one tensor, got {_short(tensors)}")
    t = tensors[0]
    if not isinstance(t, dict):
        raise BadRequest(f"inputs[0] must be an object, got {_short(t)}")
    for key in ("name", "shape", "datatype"):
        if key not in t:
            raise BadRequest(f"inputs[0] lacks {key!r}")
    shape = t["shape"]
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d >= 0 for d in shape)):
        raise BadRequest(f"inputs[0].shape must be a list of non-negative integers, got {_short(shape)}")
    return t


def _tensor_data(t: dict, tail: bytes) -> list | bytes:
    """inputs[0]'s values: a flat list from JSON "data", or its bytes from the binary tail."""
    size = _parameters(t, "inputs[0]").get("binary_data_size")
    if size is None:
        if tail:
            raise BadRequest(f"{len(tail)} bytes follow the JSON header but no input has "
                             "parameters.binary_data_size")
        if "data" not in t:
            raise BadRequest("inputs[0] lacks 'data' (or parameters.binary_data_size with binary data)")
        flat = _flatten(t["data"])
        if math.prod(t["shape"]) != len(flat):
            raise BadRequest(f"inputs[0].shape {t['shape']} holds {math.prod(t['shape'])} values "
                             f"but data has {len(flat)}")
        return flat
    if "data" in t:
        raise BadRequest("inputs[0] has both 'data' and parameters.binary_data_size; send one")
    if not _is_int(size) or size != len(tail):
        raise BadRequest(f"inputs[0].parameters.binary_data_size is {_short(size)} but "
                         f"{len(tail)} bytes follow the JSON header")
    return tail


def _numeric_inputs(t: dict, data: list | bytes, sample_shape: tuple[int, ...]) -> list:
    shape, datatype = t["shape"], t["datatype"]
    if not isinstance(datatype, str) or datatype not in NUMPY_TYPES:
        raise BadRequest(f"inputs[0].datatype must be numeric (e.g. 'FP32'), got {_short(datatype)}")
    per = math.prod(sample_shape)
    if shape[0] == 0 or math.prod(shape[1:]) != per:
        raise BadRequest(f"inputs[0].shape {shape} does not fit this model: expected [n, "
                         f"{', '.join(map(str, sample_shape))}] with n >= 1 (or [n, {per}])")
    values = _decode_numbers(data, datatype, shape) if isinstance(data, bytes) else _json_numbers(data, datatype)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise BadRequest(f"inputs[0] value {bad} is {values[bad]}: inputs must be finite numbers")
    return list(values.reshape(shape[0], per))


def _json_numbers(data: list, datatype: str) -> np.ndarray:
    """Numbers sent as a list (JSON "data", or a gRPC front end's typed contents) as float64,
    each checked against what `datatype` can hold."""
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
        raise BadRequest(f"{datatype} data must be JSON numbers")
    if "INT" in datatype and not all(isinstance(x, int) for x in data):
        raise BadRequest(f"{datatype} data must be JSON integers; send FP32 for fractional values")
    try:
        values = np.array(data, dtype=np.float64)
    except OverflowError:     # an integer beyond float64's range
        raise BadRequest(f"{datatype} data holds a number beyond float64's range") from None
    check_range(data, values, datatype)
    return values


def check_range(data: Sequence, values: np.ndarray, datatype: str, where: str = "inputs[0]") -> None:
    """Refuse the first of `data` (its float64 copy in `values`) that `datatype` cannot hold.

    Non-finite values are left to the caller's finiteness check. Near the bounds of INT64 and
    UINT64 float64 cannot tell neighbours apart, so candidates there are compared exactly."""
    lo, hi = RANGES[datatype]
    outside = np.isfinite(values) & ((values < lo) | (values > hi))
    if datatype in ("INT64", "UINT64"):
        outside |= np.abs(values) >= 2.0 ** 62
    for i in np.flatnonzero(outside):
        x = data[int(i)]
        if not lo <= x <= hi:
            bounds = f"{lo}..{hi}" if "INT" in datatype else f"finite magnitudes up to {hi:.8g}"
            raise BadRequest(f"{where} value {int(i)} is {_short(x)}: outside {datatype}'s "
                             f"range ({bounds})")


def _decode_numbers(data: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    """The values of a binary numeric tensor as float64, like JSON numbers (a fresh, writable array)."""
    item = np.dtype(NUMPY_TYPES[datatype]).itemsize
    if len(data) != math.prod(shape) * item:
        raise BadRequest(f"inputs[0] is {datatype} of shape {shape}: {math.prod(shape) * item} "
                         f"bytes expected, {len(data)} sent")
    values = np.frombuffer(data, dtype=NUMPY_TYPES[datatype])
    if datatype == "BF16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float64)


def _text_inputs(t: dict, data: list | bytes) -> list[str]:
    shape, datatype = t["shape"], t["datatype"]
    if datatype != "BYTES":
        raise BadRequest(f"this model takes text: inputs[0].datatype must be 'BYTES', got {_short(datatype)}")
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        # [n, 1] is how Triton clients batch one string per input (the model config's dims [1])
        raise BadRequest(f"text inputs must have shape [n] or [n, 1], got {shape}")
    if isinstance(data, bytes):
        data = _decode_strings(data, shape[0])
    if not all(isinstance(x, str) for x in data):
        raise BadRequest("BYTES data must be JSON strings")
    return data


def _decode_strings(data: bytes, count: int) -> list[str]:
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise BadRequest(f"BYTES element {len(out)} is cut short: its 4-byte length is incomplete")
        (n,) = struct.unpack_from("<I", data, at)
        if at + 4 + n > len(data):
            raise BadRequest(f"BYTES element {len(out)} claims {n} bytes but {len(data) - at - 4} remain")
        try:
            out.append(data[at + 4:at + 4 + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"BYTES element {len(out)} is not UTF-8 text") from None
        at += 4 + n
    if len(out) != count:
        raise BadRequest(f"inputs[0].shape [{count}] but the binary data holds {len(out)} elements")
    return out


def _requested_outputs(body: dict) -> tuple[tuple[str, bool], ...]:
    default = _parameters(body, "the request").get("binary_data_output", False)
    if not isinstance(default, bool):
        raise BadRequest(f"parameters.binary_data_output must be true or false, got {_short(default)}")
    asked = body.get("outputs")
    if asked is None:
        return tuple((name, default) for name in OUTPUTS)
    if not isinstance(asked, list) or not asked:
        raise BadRequest(f"'outputs' must be a non-empty list of {{\"name\": ...}}, got {_short(asked)}")
    return tuple(_requested_output(i, o, default) for i, o in enumerate(asked))


def _requested_output(i: int, o: Any, default: bool) -> tuple[str, bool]:
    name = o.get("name") if isinstance(o, dict) else None
    if name not in OUTPUTS:
        raise BadRequest(f"outputs[{i}] names no output of this model: {_short(name)}; "
                         f"outputs are {', '.join(OUTPUTS)}")
    params = _parameters(o, f"outputs[{i}]")
    if "classification" in params:
        raise BadRequest(f"outputs[{i}].parameters.classification is not supported; "
                         "ask for 'label' and 'logits'")
    binary = params.get("binary_data", default)
    if not isinstance(binary, bool):
        raise BadRequest(f"outputs[{i}].parameters.binary_data must be true or false, got {_short(binary)}")
    return name, binary


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object, got {_short(params)}")
    return params


def _flatten(data) -> list:
    if not isinstance(data, list):
        raise BadRequest(f"inputs[0].data must be a list, got {_short(data)}")
    out: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- responses -----------------------------------------------------------------------------

def render_response(request: InferRequest, meta: ModelMeta, results: Sequence[Any],
                    epoch: int) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or a JSON header and binary tensors after it."""
    check_finite(request, meta, results)
    n = len(results)
    tensors, blobs = [], []
    for name, binary in request.outputs:
        out = OUTPUTS[name]
        t = {"name": name, "datatype": out.datatype, "shape": [n, *out.per_sample(meta)]}
        values = out.values(results, meta)
        if binary:
            blobs.append(_encode(values, out.datatype))
            t["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            t["data"] = values
        tensors.append(t)
    head = {"model_name": meta.name, "model_version": "1", "outputs": tensors,
            # v2 parameters hold scalars only, hence strings of comma-separated exits.
            "parameters": {"exit_points": ",".join(str(r.exit_point) for r in results),
                           "exit_blocks": ",".join(str(r.exit_block) for r in results),
                           "epoch": results[0].epoch if results else epoch}}
    if request.id is not None:
        head["id"] = request.id
    text = json.dumps(head, allow_nan=False).encode()
    if not blobs:
        return text, {"Content-Type": "application/json"}
    return b"".join([text, *blobs]), {"Content-Type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(text))}


def check_finite(request: InferRequest, meta: ModelMeta, results: Sequence[Any]) -> None:
    """Refuse an answer that holds NaN or Infinity, naming the input that caused it.

    Finite inputs can still overflow the model's arithmetic (FP32 values of 1e29 do), and a
    valid JSON body has no way to carry a non-finite number."""
    for i, r in enumerate(results):
        bad = [v for v in r.logits if not math.isfinite(v)]
        if bad:
            x = request.inputs[i]
            size = (f"; its largest magnitude is {float(np.max(np.abs(x))):.4g}"
                    if isinstance(x, np.ndarray) and x.size else "")
            raise NonFiniteOutput(f"input {i} gives non-finite logits ({bad[0]}) in this model's "
                                  f"{str(meta.dtype).removeprefix('torch.')} arithmetic{size}: "
                                  "send values of a smaller magnitude")


def _encode(values: list, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))
    return np.asarray(values, dtype=NUMPY_TYPES[datatype]).tobytes()
