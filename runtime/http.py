"""The HTTP endpoint: KServe v2 / Open Inference Protocol, plus metrics and plan views.

    GET  /v2/health/live            GET /v2/health/ready
    GET  /v2                        server metadata
    GET  /v2/models/{m}             model metadata (inputs, outputs, ramps)
    GET  /v2/models/{m}/ready
    POST /v2/models/{m}/infer       JSON tensors (FP32 etc. for tensor models, BYTES for text),
                                    or Triton's binary tensor extension (v2_protocol.py)
    GET  /metrics                   Prometheus text format
    GET  /e3/plan                   the current plan, epoch and forecast (read-only)
    POST /e3/policy                 {"name": "entropy", "threshold": 0.2}: change the exit policy

Infer requests pass the admission gate (admission_gate.py) on their headers alone,
before the body is read: past capacity they get 503 with Retry-After at the cost of
next to nothing. Body reads time out (408, connection closed).

Every error is JSON `{"error": "..."}` with a 4xx/5xx status, aiohttp's own
404/405/413 included. The exit point each input took is in the response:
as the output tensors `exit_point` / `exit_block`, and as comma-separated
strings in `parameters` (v2 parameters hold scalars only).
"""
from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from e3.models.errors import ModelError

from . import v2_protocol as v2
from .admission_gate import AdmissionGate, LoopLagProbe, Refused, gate_for, runtime_backlog
from .errors import DeadlineExceededError, NotReadyError, OverloadedError, RuntimeError_
from .runtime import Runtime
from .v2_protocol import BadRequest

log = logging.getLogger(__name__)

RUNTIME_KEY = web.AppKey("runtime", Runtime)
LIMITS_KEY = web.AppKey("limits", dict)
GATE_KEY = web.AppKey("gate", AdmissionGate)
LAG_PROBE_KEY = web.AppKey("lag_probe", LoopLagProbe)
PARSE_INLINE_BYTES = 64 * 1024    # bodies above this are parsed on a thread


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
        return _refused(request, exc.status, exc.reason if exc.status != 413 else
                        f"request body too large (limit {request.app[LIMITS_KEY]['max_body']} bytes)")
    except (BadRequest, ModelError) as exc:
        return _refused(request, 400, str(exc))
    except (OverloadedError, NotReadyError) as exc:
        return error(exc.status, str(exc), {"Retry-After": str(exc.retry_after_s)})
    except RuntimeError_ as exc:
        return _refused(request, exc.status, str(exc)) if exc.status < 500 else error(exc.status, str(exc))
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "internal error (see the node's log)")


def _refused(request: web.Request, status: int, message: str) -> web.Response:
    """A 4xx: counted, since such requests never reach the runtime's own counters."""
    _runtime(request).metrics.bad_request(status)
    return error(status, message)


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
    return web.json_response({"name": "e3", "version": "0.1.0", "extensions": ["binary_tensor_data", "e3-early-exit"]})


async def model_meta(request):
    rt = _check_model(request)
    m = rt.meta
    return web.json_response({
        "name": m.name, "versions": ["1"], "platform": f"e3-early-exit/{m.family}",
        "inputs": v2.input_metadata(m), "outputs": v2.output_metadata(m),
        "parameters": {"e3": m.describe(), "policy": rt.policy.describe()}})


async def model_ready(request):
    rt = _check_model(request)
    return web.json_response({"name": rt.meta.name, "ready": rt.ready}, status=200 if rt.ready else 503)


async def infer(request):
    rt = _check_model(request)
    try:
        # Before the body is read, parsed or encoded: past capacity a refusal must cost
        # the loop next to nothing, or refusing starves the requests already admitted.
        ticket = request.app[GATE_KEY].admit(request.content_length)
    except Refused as exc:
        rt.metrics.http_refused(exc.reason)
        return error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    with ticket:
        raw = await _read_body(request)
        if raw is None:
            return await _body_timed_out(request)
        header = request.headers.get(v2.HEADER_LENGTH)
        if len(raw) > PARSE_INLINE_BYTES:     # ~25 ms per MB of JSON numbers: off the event loop
            call = await asyncio.get_running_loop().run_in_executor(None, v2.parse_request, raw, header, rt.meta)
        else:
            call = v2.parse_request(raw, header, rt.meta)
        del raw
        ticket.body_done()
        limit = request.app[LIMITS_KEY]["max_inputs"]
        if len(call.inputs) > limit:
            raise BadRequest(f"{len(call.inputs)} inputs in one request; the limit is {limit}")
        try:
            results = await rt.infer(call.inputs)
        except DeadlineExceededError:
            ticket.answered()          # as late as an answer can be: the limit backs off
            raise
        body, headers = v2.render_response(call, rt.meta, results, rt.epoch)
        ticket.answered()
        return web.Response(body=body, headers=headers)


async def _read_body(request: web.Request) -> bytes | None:
    """The request body, or None when it did not arrive within server.body_timeout_s."""
    timeout_s = request.app[LIMITS_KEY]["body_timeout_s"]
    try:
        if sys.version_info >= (3, 11):     # a timer, not a task per request as wait_for makes
            async with asyncio.timeout(timeout_s):
                return await request.read()
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        return None


async def _body_timed_out(request: web.Request) -> web.Response:
    """408, and the connection closed once it is sent: a client that trickles its body holds
    no place after it (aiohttp would otherwise linger, reading the rest for 10 s)."""
    resp = _refused(request, 408, f"request body not received within {request.app[LIMITS_KEY]['body_timeout_s']} s "
                                  "(server.body_timeout_s)")
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    request.protocol.force_close()
    return resp


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
    body = v2.strict_json(await request.read())
    if not isinstance(body, dict) or not isinstance(body.get("threshold"), (int, float)):
        raise BadRequest("body must be {\"name\": policy, \"threshold\": number}")
    await rt.set_policy(body.get("name", rt.policy.name), body["threshold"])
    return web.json_response(rt.policy.describe())


async def _start_probe(probe: LoopLagProbe) -> None:
    probe.start()


def make_app(runtime: Runtime) -> web.Application:
    """The aiohttp application for `runtime` (which the caller starts and closes)."""
    sc = runtime.config.server
    app = web.Application(middlewares=[errors_as_json], client_max_size=sc.max_body_bytes)
    app[RUNTIME_KEY] = runtime
    app[LIMITS_KEY] = {"max_body": sc.max_body_bytes, "max_inputs": sc.max_inputs,
                       "body_timeout_s": sc.body_timeout_s}
    app[GATE_KEY] = gate = gate_for(runtime.config, runtime_backlog(runtime))
    app[LAG_PROBE_KEY] = probe = LoopLagProbe(gate)
    app.on_startup.append(lambda app: _start_probe(probe))
    app.on_cleanup.append(lambda app: probe.close())
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
