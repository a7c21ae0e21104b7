"""The HTTP endpoint: KServe v2 / Open Inference Protocol, plus metrics and plan views.

    GET  /v2/health/live            GET /v2/health/ready
    GET  /v2                        server metadata
    GET  /v2/models/{m}             model metadata (inputs, outputs, ramps)
    GET  /v2/models/{m}/ready
    POST /v2/models/{m}/infer       JSON tensors (FP32 etc. for tensor models, BYTES for text)
    GET  /metrics                   Prometheus text format
    GET  /e3/plan                   the current plan, epoch and forecast (read-only)
    POST /e3/policy                 {"name": "entropy", "threshold": 0.2}: change the exit policy

Every error is JSON `{"error": "..."}` with a 4xx/5xx status, aiohttp's own
404/405/413 included. The exit point each input took is in the response:
as the output tensors `exit_point` / `exit_block`, and as comma-separated
strings in `parameters` (v2 parameters hold scalars only).
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web

from e3.models.base import InputKind
from e3.models.errors import ModelError

from .errors import OverloadedError, NotReadyError, RuntimeError_
from .runtime import Runtime

log = logging.getLogger(__name__)

RUNTIME_KEY = web.AppKey("runtime", Runtime)
LIMITS_KEY = web.AppKey("limits", dict)
NUMERIC = {"FP32", "FP64", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class BadRequest(ValueError):
    """Raised while parsing a request that breaks the protocol; answered with 400."""


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def errors_as_json(request: web.Request, handler):
    """Map every failure to a JSON error; the node keeps serving."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason if exc.status != 413 else
                     f"request body too large (limit {request.app[LIMITS_KEY]['max_body']} bytes)")
    except (BadRequest, ModelError) as exc:
        return error(400, str(exc))
    except (OverloadedError, NotReadyError) as exc:
        return error(exc.status, str(exc), {"Retry-After": str(exc.retry_after_s)})
    except RuntimeError_ as exc:
        return error(exc.status, str(exc))
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "internal error (see the node's log)")


def _runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME_KEY]


def _check_model(request: web.Request) -> Runtime:
    rt = _runtime(request)
    name = request.match_info["model"]
    if name != rt.meta.name:
        raise web.HTTPNotFound(reason=f"unknown model {name!r}; this node serves {rt.meta.name!r}")
    version = request.match_info.get("version")
    if version not in (None, "1"):
        raise web.HTTPNotFound(reason=f"unknown version {version!r} of model {name!r}; only '1' exists")
    return rt


async def live(request):
    return web.json_response({"live": True})


async def ready(request):
    ok = _runtime(request).ready
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def server_meta(request):
    return web.json_response({"name": "e3", "version": "0.1.0", "extensions": ["e3-early-exit"]})


async def model_meta(request):
    rt = _check_model(request)
    m = rt.meta
    if m.input_kind == InputKind.TEXT:
        inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    else:
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, *m.input_shape]}]
    return web.json_response({
        "name": m.name, "versions": ["1"], "platform": f"e3-early-exit/{m.family}",
        "inputs": inputs,
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, m.num_classes]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "exit_point", "datatype": "INT64", "shape": [-1]},
                    {"name": "exit_block", "datatype": "INT64", "shape": [-1]}],
        "parameters": {"e3": m.describe(), "policy": rt.policy.describe()}})


async def model_ready(request):
    rt = _check_model(request)
    return web.json_response({"name": rt.meta.name, "ready": rt.ready}, status=200 if rt.ready else 503)


async def infer(request):
    rt = _check_model(request)
    if "Inference-Header-Content-Length" in request.headers:
        raise BadRequest("the binary tensor extension is not supported; send JSON tensors")
    try:
        body = await request.json(loads=_strict_loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    inputs = parse_inputs(body, rt)
    limit = request.app[LIMITS_KEY]["max_inputs"]
    if len(inputs) > limit:
        raise BadRequest(f"{len(inputs)} inputs in one request; the limit is {limit}")
    results = await rt.infer(inputs)
    return web.json_response(render_outputs(body, rt, results))


def _strict_loads(text: str) -> Any:
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")
    return json.loads(text, parse_constant=no_constants)


def parse_inputs(body: Any, rt: Runtime) -> list:
    """The list of per-sample inputs in a v2 request body, or BadRequest naming the problem."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    tensors = body.get("inputs")
    if not isinstance(tensors, list) or len(tensors) != 1:
        raise BadRequest(f"'inputs' must be a list holding exactly one tensor, got {_short(tensors)}")
    t = tensors[0]
    if not isinstance(t, dict):
        raise BadRequest(f"inputs[0] must be an object, got {_short(t)}")
    for key in ("name", "shape", "datatype", "data"):
        if key not in t:
            raise BadRequest(f"inputs[0] lacks {key!r}")
    shape, datatype, data = t["shape"], t["datatype"], t["data"]
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise BadRequest(f"inputs[0].shape must be a list of non-negative integers, got {_short(shape)}")
    flat = _flatten(data)
    if math.prod(shape) != len(flat):
        raise BadRequest(f"inputs[0].shape {shape} holds {math.prod(shape)} values but data has {len(flat)}")
    if rt.meta.input_kind == InputKind.TEXT:
        return _text_inputs(shape, datatype, flat)
    return _tensor_inputs(shape, datatype, flat, rt.meta.input_shape)


def _text_inputs(shape, datatype, flat) -> list[str]:
    if datatype != "BYTES":
        raise BadRequest(f"this model takes text: inputs[0].datatype must be 'BYTES', got {datatype!r}")
    if len(shape) != 1:
        raise BadRequest(f"text inputs must have shape [n], got {shape}")
    if not all(isinstance(x, str) for x in flat):
        raise BadRequest("BYTES data must be JSON strings")
    return flat


def _tensor_inputs(shape, datatype, flat, sample_shape) -> list[list[float]]:
    if datatype not in NUMERIC:
        raise BadRequest(f"inputs[0].datatype must be numeric (e.g. 'FP32'), got {datatype!r}")
    per = math.prod(sample_shape)
    if shape[0] == 0 or math.prod(shape[1:]) != per:
        raise BadRequest(f"inputs[0].shape {shape} does not fit this model: expected [n, "
                         f"{', '.join(map(str, sample_shape))}] with n >= 1 (or [n, {per}])")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        raise BadRequest(f"{datatype} data must be JSON numbers")
    return [flat[i * per:(i + 1) * per] for i in range(shape[0])]


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


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def render_outputs(body: dict, rt: Runtime, results) -> dict:
    n, c = len(results), rt.meta.num_classes
    labels = rt.meta.labels
    out = {
        "model_name": rt.meta.name, "model_version": "1",
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [n, c], "data": [v for r in results for v in r.logits]},
            {"name": "label", "datatype": "INT64", "shape": [n], "data": [r.label for r in results]},
            {"name": "label_name", "datatype": "BYTES", "shape": [n], "data": [labels[r.label] for r in results]},
            {"name": "exit_point", "datatype": "INT64", "shape": [n], "data": [r.exit_point for r in results]},
            {"name": "exit_block", "datatype": "INT64", "shape": [n], "data": [r.exit_block for r in results]},
        ],
        "parameters": {"exit_points": ",".join(str(r.exit_point) for r in results),
                       "exit_blocks": ",".join(str(r.exit_block) for r in results),
                       "epoch": results[0].epoch if results else rt.epoch},
    }
    if isinstance(body.get("id"), str):
        out["id"] = body["id"]
    return out


async def metrics(request):
    rt = _runtime(request)
    return web.Response(body=rt.metrics.render(), headers={"Content-Type": rt.metrics.content_type})


async def plan_view(request):
    rt = _runtime(request)
    view = {"epoch": rt.epoch, "placement": rt.placement.to_json() if rt.placement else None,
            "policy": rt.policy.describe(), "model": rt.meta.describe()}
    if rt.planner is not None:
        view["planner"] = rt.planner.view()
    return web.json_response(view)


async def set_policy(request):
    rt = _runtime(request)
    try:
        body = await request.json(loads=_strict_loads)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("threshold"), (int, float)):
        raise BadRequest("body must be {\"name\": policy, \"threshold\": number}")
    await rt.set_policy(body.get("name", rt.policy.name), body["threshold"])
    return web.json_response(rt.policy.describe())


def make_app(runtime: Runtime) -> web.Application:
    """The aiohttp application for `runtime` (which the caller starts and closes)."""
    sc = runtime.config.server
    app = web.Application(middlewares=[errors_as_json], client_max_size=sc.max_body_bytes)
    app[RUNTIME_KEY] = runtime
    app[LIMITS_KEY] = {"max_body": sc.max_body_bytes, "max_inputs": sc.max_inputs}
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_meta)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_meta)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_post(prefix + "/infer", infer)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/e3/plan", plan_view)
    app.router.add_post("/e3/policy", set_policy)
    return app
