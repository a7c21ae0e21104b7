"""The OpenAI-compatible HTTP routes of a served causal LM (runtime/llm_service.py).

    GET  /v1/models              the one model served
    POST /v1/completions         {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                                 "stream", "stream_options"}; greedy by default
    POST /v1/chat/completions    {"messages": [{"role", "content"}], ...the same}; the prompt is the
                                 chat in the model's chat format (LLMService.chat_ids)

`stream: true` answers server-sent events in OpenAI's chunk shapes (`text_completion`
chunks; `chat.completion.chunk` with a `delta`, the first one carrying the role), one
chunk per token, then `data: [DONE]`; `stream_options.include_usage` adds a last chunk
with the usage. Each choice carries the extension fields `exit_layers` (decoder layers
each generated token ran; the model's depth for a full-depth token) and `tokens`; a
streamed chunk carries `exit_layer` and `token` for its token.

`finish_reason` is "length", "stop" (a stop string or the model's end of turn), or
"deadline": the engine did not make the next token within llm.token_deadline_ms, so the
answer ends there (a streamed one with a last chunk whose `token` is null). An error
after a stream has started is sent as `data: {"error": "..."}`. Bad requests get 400
`{"error": "..."}` naming the field; with every KV slot held, or while the node drains,
503 with Retry-After. A client that disconnects mid-stream aborts its sequence, whose KV
slot is freed at the engine's next step.
"""
from __future__ import annotations

import json
import logging
import time
import uuid

from aiohttp import web

from .errors import NotReadyError
from .http import error
from .llm_engine import EngineFullError, GenerationRequestError
from .llm_service import Generation, LLMService
from .openai_protocol import CompletionParams, ProtocolError, parse_chat, parse_completion

log = logging.getLogger(__name__)
SERVICE_KEY = web.AppKey("llm_service", LLMService)
BODY_LIMIT_KEY = web.AppKey("llm_body_limit", int)
MAX_BODY = 1 << 20
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@web.middleware
async def errors_as_json(request: web.Request, handler):
    """Every failure of the LLM node's routes as `{"error": ...}` with its status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _refused(request, exc.status, exc.reason if exc.status != 413 else
                        f"request body too large (limit {request.app[BODY_LIMIT_KEY]} bytes)")
    except (ProtocolError, GenerationRequestError) as exc:
        return _refused(request, 400, str(exc))
    except (EngineFullError, NotReadyError) as exc:
        return error(503, str(exc), {"Retry-After": "1"})
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "internal error (see the node's log)")


def _refused(request: web.Request, status: int, message: str) -> web.Response:
    request.app[SERVICE_KEY].metrics.bad_request(status)
    return error(status, message)


async def read_json(request: web.Request):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("the request body is not valid JSON") from None


def _check_model(service: LLMService, params: CompletionParams) -> None:
    if params.model is not None and params.model != service.name:
        raise web.HTTPNotFound(reason=f"model {params.model!r} is not served here; GET /v1/models lists "
                                      f"{service.name!r}")


async def list_models(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return web.json_response({"object": "list", "data": [
        {"id": service.name, "object": "model", "created": 0, "owned_by": "e3"}]})


async def completions(request: web.Request) -> web.StreamResponse:
    service: LLMService = request.app[SERVICE_KEY]
    params = parse_completion(await read_json(request), service.config.max_len)
    _check_model(service, params)
    gen = service.open(await service.prompt_ids(params), params)
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": service.name}
    if params.stream:
        def chunk(piece):
            return {"index": 0, "text": piece.text, "finish_reason": piece.finish, "logprobs": None,
                    "exit_layer": piece.exit_layer, "token": piece.token}
        return await stream_sse(request, gen, params, meta, chunk)
    text = await _whole(gen)
    choice = {"index": 0, "text": text, "finish_reason": gen.finish, "logprobs": None,
              "exit_layers": gen.exit_layers, "tokens": gen.tokens}
    return web.json_response({**meta, "choices": [choice], "usage": usage(gen)})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service: LLMService = request.app[SERVICE_KEY]
    params = parse_chat(await read_json(request), service.config.max_len)
    _check_model(service, params)
    gen = service.open(await service.prompt_ids(params), params)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": service.name, "system_fingerprint": None}
    if params.stream:
        def chunk(piece):
            return {"index": 0, "delta": {"content": piece.text} if piece.text or not piece.finish else {},
                    "finish_reason": piece.finish, "logprobs": None,
                    "exit_layer": piece.exit_layer, "token": piece.token}
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                 "logprobs": None}
        return await stream_sse(request, gen, params, meta, chunk, first=first)
    text = await _whole(gen)
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": gen.finish,
              "logprobs": None, "exit_layers": gen.exit_layers, "tokens": gen.tokens}
    return web.json_response({**meta, "object": "chat.completion", "choices": [choice], "usage": usage(gen)})


async def _whole(gen: Generation) -> str:
    async with gen:
        return "".join([piece.text async for piece in gen])


def usage(gen: Generation) -> dict:
    n = len(gen.tokens)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}


async def stream_sse(request, gen: Generation, params: CompletionParams, meta: dict, chunk, first=None):
    """Send `gen` as server-sent events: `first` (a choice) if given, one chunk per piece, the usage
    chunk if asked for, then [DONE]; an error once the stream has started as an error event."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)

    async def send(body: dict) -> None:
        await resp.write(b"data: " + json.dumps(body).encode() + b"\n\n")
    try:
        async with gen:         # leaving early, a disconnect included, aborts the sequence
            if first is not None:
                await send({**meta, "choices": [first]})
            try:
                async for piece in gen:
                    await send({**meta, "choices": [chunk(piece)]})
            except ConnectionResetError:
                raise
            except Exception as exc:       # the engine failed or closed mid-stream
                log.warning("stream %s ended by an error: %r", meta["id"], exc)
                await send({"error": f"generation failed: {exc}"})
        if params.include_usage:
            await send({**meta, "choices": [], "usage": usage(gen)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass                    # the client went away; its sequence is already aborted
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)


def make_app(service: LLMService) -> web.Application:
    """The OpenAI routes alone; the app starts `service` with itself, drains and closes it after.
    (`bin/e3-node --model gemma3-270m` serves these routes beside the node's own: llm_node.py.)"""
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY)
    app[SERVICE_KEY], app[BODY_LIMIT_KEY] = service, MAX_BODY
    add_routes(app)

    async def lifecycle(app):
        await service.start()
        yield
        await service.drain()
        await service.close()
    app.cleanup_ctx.append(lifecycle)
    return app
