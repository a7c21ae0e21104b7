"""An OpenAI-compatible HTTP endpoint for early-exit generation (standalone for now).

    GET  /v1/models            the one model served
    POST /v1/completions       {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                               "stream"}; greedy by default. `stream: true` answers server-sent
                               events, one `text_completion` chunk per token, then `data: [DONE]`.

Each choice carries the extension fields `exit_layers` (decoder layers each
generated token ran; the model's depth for full-depth tokens) and `tokens`; a
streamed chunk carries `exit_layer` and `token` for its token. Bad requests get
400 `{"error": "..."}` naming the field; with every KV slot held, 503 with
Retry-After. A client that disconnects mid-stream aborts its sequence, whose KV
slot is freed at the engine's next step.

    python -m e3.runtime.openai_http --model gemma3-270m --port 8000 [--no-exits] [--kv-mode exact]
"""
from __future__ import annotations

import argparse
import json
import time
import uuid

from aiohttp import web

from .http import error
from .llm_client import EngineClient
from .llm_engine import EngineFullError, GenerationRequest, GenerationRequestError
from .openai_protocol import CompletionParams, ProtocolError, StopFilter, parse_completion

SERVED_KEY = web.AppKey("served", object)
MAX_BODY = 1 << 20


class Served:
    """What the app serves: one model's engine client, its tokenizer and its end-of-text tokens."""

    def __init__(self, client: EngineClient, tokenizer, name: str, stop_tokens: tuple[int, ...]):
        self.client, self.tokenizer, self.name, self.stop_tokens = client, tokenizer, name, stop_tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except (ProtocolError, GenerationRequestError) as exc:
        return error(400, str(exc))
    except EngineFullError as exc:
        return error(503, str(exc), {"Retry-After": "1"})


async def list_models(request: web.Request) -> web.Response:
    served = request.app[SERVED_KEY]
    return web.json_response({"object": "list", "data": [
        {"id": served.name, "object": "model", "created": 0, "owned_by": "e3"}]})


async def completions(request: web.Request) -> web.StreamResponse:
    served: Served = request.app[SERVED_KEY]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("the request body is not valid JSON") from None
    params = parse_completion(body, served.client.engine.config.max_len)
    if params.model is not None and params.model != served.name:
        return error(404, f"model {params.model!r} is not served here; GET /v1/models lists {served.name!r}")
    req = GenerationRequest(served.encode(params.prompt), params.max_tokens, params.temperature,
                            params.top_p, params.seed, served.stop_tokens)
    stream = served.client.generate(req)
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": served.name}
    if params.stream:
        return await _stream(request, served, params, stream, meta, len(req.prompt))
    return await _whole(served, params, stream, meta, len(req.prompt))


async def _whole(served, params: CompletionParams, stream, meta, n_prompt) -> web.Response:
    text, layers, tokens, finish = [], [], [], "length"
    stops = StopFilter(served.decode, params.stop)
    async with stream:
        async for ev in stream:
            tokens.append(ev.token)
            layers.append(ev.exit_layer)
            text.append(stops.push(ev.token))
            finish = "stop" if stops.stopped else ev.finish
            if finish is not None:
                break
    text.append(stops.flush())
    choice = {"index": 0, "text": "".join(text), "finish_reason": finish, "logprobs": None,
              "exit_layers": layers, "tokens": tokens}
    usage = {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
             "total_tokens": n_prompt + len(tokens)}
    return web.json_response({**meta, "choices": [choice], "usage": usage})


async def _stream(request, served, params: CompletionParams, stream, meta, n_prompt) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    stops = StopFilter(served.decode, params.stop)
    try:
        async with stream:      # leaving early, a disconnect included, aborts the sequence
            async for ev in stream:
                text = stops.push(ev.token)
                finish = "stop" if stops.stopped else ev.finish
                if finish is not None:
                    text += stops.flush()
                await _send(resp, meta, text, finish, ev)
                if finish is not None:
                    break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass                    # the client went away; its sequence is already aborted
    return resp


async def _send(resp, meta, text, finish, ev) -> None:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None,
              "exit_layer": ev.exit_layer, "token": ev.token}
    await resp.write(b"data: " + json.dumps({**meta, "choices": [choice]}).encode() + b"\n\n")


def make_app(served: Served) -> web.Application:
    """The app; it starts and closes `served.client` with itself."""
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY)
    app[SERVED_KEY] = served
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", completions)

    async def lifecycle(app):
        await served.client.start()
        yield
        await served.client.close()
    app.cleanup_ctx.append(lifecycle)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e3.runtime.openai_http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", choices=["gemma3-270m"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--kv-mode", default="copy", choices=["copy", "exact"])
    p.add_argument("--no-exits", action="store_true", help="full-depth decoding")
    p.add_argument("--kv-slots", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    args = p.parse_args(argv)
    from e3.models.causal_lm import gemma3_270m
    from .llm_engine import GenerationEngine, LLMEngineConfig
    tok, model = gemma3_270m.load(args.kv_mode, exits=not args.no_exits)
    engine = GenerationEngine(model, LLMEngineConfig(args.kv_slots, args.max_len, not args.no_exits))
    served = Served(EngineClient(engine), tok, args.model, end_tokens(model.lm))
    web.run_app(make_app(served), host=args.host, port=args.port)
    return 0


def end_tokens(lm) -> tuple[int, ...]:
    """The model's end-of-text tokens (Gemma 3: <eos> and <end_of_turn>)."""
    eos = lm.generation_config.eos_token_id
    return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])


if __name__ == "__main__":
    raise SystemExit(main())
