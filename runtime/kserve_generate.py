"""The KServe / Triton generate extension for a served causal LM (runtime/llm_service.py).

    POST /v2/models/{m}[/versions/1]/generate          one JSON answer
    POST /v2/models/{m}[/versions/1]/generate_stream   server-sent events, one per token

Request (Triton's `$generate_request`): `{"text_input": "...", "parameters": {...}}`, the
parameters being `max_tokens`, `temperature`, `top_p`, `seed`, `stop` (a string or a list
of strings) and `stream` (if given, it must agree with the URL). Any other key, at the top
or in `parameters`, is a 400 naming it: this model has no other inputs, and a parameter
that would be ignored is refused rather than silently dropped.

Answer (`$generate_response`): `{"model_name", "model_version": "1", "text_output"}` plus
the extension fields `finish_reason` ("length", "stop" or "deadline", as in openai_http.py),
`exit_layers` and `tokens`. A streamed event carries its token's `text_output` piece,
`exit_layer`, `token` and, on the last one, `finish_reason`. Errors before any token are
`{"error": ...}` with a 4xx/5xx status; an error after the stream started is an event
`{"error": ...}` (the status is already 200, as the extension says).
"""
from __future__ import annotations

import json
import logging

from aiohttp import web

from .llm_service import LLMService
from .openai_http import SERVICE_KEY, SSE_HEADERS, read_json
from .openai_protocol import (CompletionParams, ProtocolError, bool_field, int_field, number_field,
                              optional_field, short, stop_field)

log = logging.getLogger(__name__)
PARAMETERS = {"max_tokens", "temperature", "top_p", "seed", "stop", "stream"}


def parse_generate(body, max_tokens_limit: int, stream: bool) -> CompletionParams:
    """The parameters of generate request `body`; ProtocolError naming what is wrong."""
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    extra = set(body) - {"text_input", "parameters"}
    if extra:
        raise ProtocolError(f"unknown field(s) {sorted(extra)}: this model takes text_input and parameters")
    text = body.get("text_input")
    if not isinstance(text, str) or not text:
        raise ProtocolError(f"text_input must be a non-empty string, got {short(text)}")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"parameters must be an object, got {short(params)}")
    unknown = set(params) - PARAMETERS
    if unknown:
        raise ProtocolError(f"unknown parameter(s) {sorted(unknown)}; known: {sorted(PARAMETERS)}")
    asked = bool_field(params, "stream", stream, "parameters.stream")
    if asked != stream:
        raise ProtocolError(f"parameters.stream is {str(asked).lower()}, but this URL "
                            f"{'streams' if stream else 'does not stream'}: use "
                            f"{'generate_stream' if asked else 'generate'}")
    return CompletionParams(
        prompt=text, max_tokens=int_field(params, "max_tokens", 16, 1, max_tokens_limit),
        temperature=number_field(params, "temperature", 0.0, 0.0, 2.0),
        top_p=number_field(params, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=optional_field(params, "seed", int, "an integer"), stop=stop_field(params.get("stop")),
        stream=stream)


def _check_model(request: web.Request) -> LLMService:
    service = request.app[SERVICE_KEY]
    name = request.match_info["model"]
    if name != service.name:
        raise web.HTTPNotFound(reason=f"unknown model {name!r}; this node serves {service.name!r}")
    version = request.match_info.get("version")
    if version not in (None, "1"):
        raise web.HTTPNotFound(reason=f"unknown version {version!r} of model {name!r}; only '1' exists")
    return service


async def generate(request: web.Request) -> web.Response:
    service = _check_model(request)
    params = parse_generate(await read_json(request), service.config.max_len, stream=False)
    gen = service.open(await service.prompt_ids(params), params)
    async with gen:
        text = "".join([piece.text async for piece in gen])
    return web.json_response({"model_name": service.name, "model_version": "1", "text_output": text,
                              "finish_reason": gen.finish, "exit_layers": gen.exit_layers,
                              "tokens": gen.tokens})


async def generate_stream(request: web.Request) -> web.StreamResponse:
    service = _check_model(request)
    params = parse_generate(await read_json(request), service.config.max_len, stream=True)
    gen = service.open(await service.prompt_ids(params), params)
    resp = web.StreamResponse(headers={**SSE_HEADERS, "Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)

    async def send(body: dict) -> None:
        await resp.write(b"data: " + json.dumps(body).encode() + b"\n\n")
    try:
        async with gen:         # leaving early, a disconnect included, aborts the sequence
            try:
                async for piece in gen:
                    await send({"model_name": service.name, "model_version": "1", "text_output": piece.text,
                                "exit_layer": piece.exit_layer, "token": piece.token,
                                "finish_reason": piece.finish})
            except ConnectionResetError:
                raise
            except Exception as exc:       # the engine failed or closed mid-stream
                log.warning("generate_stream ended by an error: %r", exc)
                await send({"error": f"generation failed: {exc}"})
        await resp.write_eof()
    except ConnectionResetError:
        pass                    # the client went away; its sequence is already aborted
    return resp


def add_routes(app: web.Application) -> None:
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_post(prefix + "/generate", generate)
        app.router.add_post(prefix + "/generate_stream", generate_stream)
