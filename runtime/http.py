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

Triton's HTTP extensions (model repository index, model configuration,
statistics) are served by triton_extensions.py.

Infer requests pass the admission gate (admission_gate.py) on their headers alone,
before the body is read: past capacity they get 503 with Retry-After at the cost of
next to nothing. Body reads time out (408, connection closed).

Every error is JSON `{"error": "..."}` with a 4xx/5xx status, aiohttp's own
404/405/413 included, and what aiohttp's HTTP parser refuses before any route
runs (a 10 kB URL, a bad header line) when the app is served by `NodeRunner`.
The exit point each input took is in the response:
as the output tensors `exit_point` / `exit_block`, and as comma-separated
strings in `parameters` (v2 parameters hold scalars only).
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from e3.models.errors import ModelError

from . import triton_extensions
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
# The codings aiohttp decodes (br and zstd only with their libraries installed; without them its
# parser refuses the request, and NodeRunner's handler answers 415). aiohttp passes any other
# coding through undecoded, so the endpoint refuses those itself rather than parse compressed bytes.
DECODED_ENCODINGS = ("identity", "gzip", "deflate", "br", "zstd")


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
    except BadRequest as exc:
        return _refused(request, exc.status, str(exc))
    except ModelError as exc:
        return _refused(request, 400, str(exc))
    except ClientGone:
        return error(400, "the client closed the connection before its request body was complete")
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


class ClientGone(Exception):
    """The client disconnected while its body was being read: nobody is left to answer."""


class UnsupportedEncoding(BadRequest):
    """A Content-Encoding the node cannot decode (a JSON error, not a status-line reason: the
    coding's text is the client's)."""
    status = 415


async def read_body(request: web.Request) -> bytes:
    """The request body, decoded per its Content-Encoding; a body that cannot be decoded is a 400
    naming the problem, an unsupported coding a 415, and a client that leaves mid-body one log line."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if coding not in DECODED_ENCODINGS:
        raise UnsupportedEncoding(f"Content-Encoding {_clip(coding)!r} is not supported; send one of "
                                  f"{', '.join(DECODED_ENCODINGS)}")
    try:
        return await request.read()
    except RequestPayloadError as exc:
        raise BadRequest(f"the request body is not valid {coding} data: {_root_cause(exc)}") from None
    except ConnectionResetError:
        log.info("client %s disconnected before the end of its request body (%s %s, Content-Length %s)",
                 request.remote, request.method, _clip(request.path, 80), request.content_length)
        raise ClientGone() from None


def _root_cause(exc: BaseException) -> str:
    """The innermost message in exc's chain (aiohttp wraps zlib's or brotli's own error twice)."""
    text = ""
    for _ in range(8):          # a chain is short; the bound guards against a cycle
        if exc is None:
            break
        text = (exc.message if isinstance(exc, HttpProcessingError) else str(exc)) or text
        exc = exc.__cause__ or exc.__context__
    return _clip(text or "undecodable bytes")


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    return web.json_response({"name": "e3", "version": "0.1.0",
                              "extensions": ["binary_tensor_data", *triton_extensions.EXTENSIONS, "e3-early-exit"]})


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
        resp = error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
        if request.body_exists:
            # Its body is unread: the connection closes after the answer (and a short lingering
            # read, listener.py) rather than go on to a next request behind a refused body.
            resp.force_close()
        return resp
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
    """The decoded request body (read_body), or None when it did not arrive within server.body_timeout_s."""
    timeout_s = request.app[LIMITS_KEY]["body_timeout_s"]
    try:
        async with asyncio.timeout(timeout_s):     # a timer, not a task per request as wait_for makes
            return await read_body(request)
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
    body = v2.strict_json(await read_body(request))
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
    # before /v2/models/{model}, so that /v2/models/stats is the statistics, not a model named "stats"
    triton_extensions.TritonExtensions(_runtime, _check_model, read_body).add_routes(app)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_meta)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_post(prefix + "/infer", infer)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/e3/plan", plan_view)
    app.router.add_post("/e3/policy", set_policy)
    return app


# -- aiohttp's own refusals, as JSON ------------------------------------------------------------
#
# What aiohttp's HTTP parser refuses (a request line or header over 8190 bytes, a malformed
# header, a coding it cannot decode) never reaches a route or a middleware: the connection's
# RequestHandler answers it from `handle_error`, in text/plain. aiohttp offers no option for that
# body, so the node serves its app with a RequestHandler subclass that answers in JSON: the one
# place every such answer passes through. aiohttp builds the handler in `Server.__call__` and the
# Server in `AppRunner._make_server`, so both are subclassed; the app, its startup and cleanup, and
# every RequestHandler setting stay aiohttp's own.

class JsonErrorHandler(web.RequestHandler):
    """A connection handler whose own error answers are `{"error": ...}` JSON, logged in one line."""
    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:      # a response is under way: nothing more can be sent
            raise ConnectionError("a response was already started; cannot send the error")
        if status >= 500:
            self.logger.error("error handling a request from %s", request.remote, exc_info=exc)
            text = "internal error (see the node's log)"
        else:
            what = "malformed HTTP request"
            if isinstance(exc, ContentEncodingError) and "Can not decode content-encoding" in (message or ""):
                status, what = 415, "unsupported Content-Encoding"
            text = f"{what}: {_clip(message or exc or 'refused by the HTTP parser')}"
            self.logger.info("refused a request from %s (%d): %s", request.remote, status, text)
        resp = web.json_response({"error": text}, status=status)
        resp.force_close()
        return resp

    def log_exception(self, *args, **kw) -> None:
        """A client's broken body or connection, met again while aiohttp drains the rest of the
        body after the answer, is the client's doing: a debug line, not an ERROR traceback."""
        exc = kw.get("exc_info")
        if isinstance(exc, (RequestPayloadError, HttpProcessingError, ConnectionError)):
            self.logger.debug("%s: %s", args[0] % args[1:] if args else "client error", _clip(repr(exc)))
            return
        super().log_exception(*args, **kw)


class JsonErrorServer(web.Server):
    """aiohttp's Server, making JsonErrorHandler connections."""

    def __call__(self) -> web.RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class NodeRunner(web.AppRunner):
    """An AppRunner whose connections answer aiohttp's own refusals in JSON (see above)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()      # runs the app's startup and freezes it
        return JsonErrorServer(plain.request_handler, request_factory=plain.request_factory,
                               handler_cancellation=plain.handler_cancellation,
                               loop=asyncio.get_running_loop(), **plain._kwargs)
