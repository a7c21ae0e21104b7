"""`bin/e3-node --model gemma3-270m`: the node serving a causal LM over HTTP.

One aiohttp app on the node's port (server.host, 127.0.0.1 by default):

    GET  /v2/health/live  /v2/health/ready  /v2  /v2/models/{m}  /v2/models/{m}/ready
    POST /v2/models/{m}/generate  /v2/models/{m}/generate_stream   (kserve_generate.py)
    GET  /v1/models   POST /v1/completions  /v1/chat/completions   (openai_http.py)
    GET  /metrics                                                  (Prometheus, LLMMetrics)

The engine computes on its own thread (llm_client.py), never on the event loop.
The weights load on a daemon thread too, so a Ctrl-C while they load (or, on first
use, while the exit estimators train) stops the node at once. Lifecycle: load, start
the engine, listen, print the demo and a query to paste; on SIGINT/SIGTERM stop
listening, refuse new requests (503) while the running sequences finish (at most
llm.drain_timeout_s), stop the engine, close the connections.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time

from aiohttp import web

from .config import E3Config
from .errors import RuntimeError_
from .heap import freeze_heap
from .kserve_generate import add_routes as add_generate_routes
from .listener import make_runner, make_site
from .llm_service import LLMService, load_service
from .openai_http import BODY_LIMIT_KEY, MAX_BODY, SERVICE_KEY, add_routes as add_openai_routes, errors_as_json

DEMO_PROMPT = "The capital of France is"
DEMO_TOKENS = 20
DEMO_PER_LINE = 6


def make_app(service: LLMService, config: E3Config) -> web.Application:
    """The node's app for `service` (which the caller starts and stops)."""
    # A prompt is at most llm.max_len tokens: 1 MiB of JSON is far more than any admissible one.
    limit = min(MAX_BODY, config.server.max_body_bytes)
    app = web.Application(middlewares=[errors_as_json], client_max_size=limit)
    app[SERVICE_KEY], app[BODY_LIMIT_KEY] = service, limit
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_meta)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_meta)
        app.router.add_get(prefix + "/ready", model_ready)
    add_generate_routes(app)
    add_openai_routes(app)
    app.router.add_get("/metrics", metrics)
    return app


async def live(request):
    return web.json_response({"live": True})


async def ready(request):
    ok = request.app[SERVICE_KEY].ready
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def server_meta(request):
    return web.json_response({"name": "e3", "version": "0.1.0", "extensions": ["generate", "e3-early-exit"]})


def _service_for(request) -> LLMService:
    service = request.app[SERVICE_KEY]
    name = request.match_info["model"]
    if name != service.name:
        raise web.HTTPNotFound(reason=f"unknown model {name!r}; this node serves {service.name!r}")
    if request.match_info.get("version") not in (None, "1"):
        raise web.HTTPNotFound(reason=f"unknown version {request.match_info['version']!r} of model "
                                      f"{name!r}; only '1' exists")
    return service


async def model_meta(request):
    service = _service_for(request)
    return web.json_response({
        "name": service.name, "versions": ["1"], "platform": "e3-early-exit/causal_lm",
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}],
        "parameters": {"e3": describe(service)}})


async def model_ready(request):
    service = _service_for(request)
    return web.json_response({"name": service.name, "ready": service.ready}, status=200 if service.ready else 503)


async def metrics(request):
    m = request.app[SERVICE_KEY].metrics
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


def describe(service: LLMService) -> dict:
    model, c = service.client.engine.model, service.config
    return {"num_layers": model.num_layers, "exits": list(model.exits), "use_exits": c.use_exits,
            "kv_mode": model.kv_mode, "kv_slots": c.kv_slots, "max_len": c.max_len,
            "token_deadline_ms": c.token_deadline_ms, "split_layers": c.split_layers,
            "chat_format": service.chat_format}


# ---- running the node ---------------------------------------------------------------------

async def in_daemon_thread(fn):
    """fn() on a daemon thread: unlike the default executor, the process need not wait for it
    to end when the node stops (a Ctrl-C during a first start's estimator training)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result, exc) -> None:
        if not done.done():
            done.set_exception(exc) if exc is not None else done.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:     # handed to the loop, never lost
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:           # the loop has closed: nobody waits any more
            pass
    threading.Thread(target=run, name="e3-llm-load", daemon=True).start()
    return await done


class LLMNode:
    """start() / shutdown() of the service, the app and its listener, in that order and back.
    `loader` makes the unstarted service (blocking; default: the built-in model config.model.path)."""

    def __init__(self, config: E3Config, loader=None):
        self.config = config
        self._loader = loader or (lambda: load_service(config.model.path, config.llm))
        self.service: LLMService | None = None
        self.runner: web.AppRunner | None = None
        self.url: str | None = None

    async def start(self, demo: bool) -> None:
        self.service = await in_daemon_thread(self._loader)
        name = self.service.name
        await self.service.start()
        self.runner = make_runner(make_app(self.service, self.config), self.config.server)
        await self.runner.setup()
        host, port = self.config.server.host, self.config.server.port
        try:
            await make_site(self.runner, self.config.server).start()
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise RuntimeError_(f"cannot listen on {host}:{port}: {reason}") from exc
        self.url = f"http://{host}:{self.runner.addresses[0][1]}"
        d = describe(self.service)
        exits = (f"exits after layers {', '.join(map(str, d['exits']))} of {d['num_layers']}, {d['kv_mode']} KV"
                 if d["use_exits"] else f"exits off: every token runs all {d['num_layers']} layers")
        if d["split_layers"]:
            exits += (f"; decode split after layers {', '.join(map(str, d['split_layers']))}, survivors of "
                      f"several steps merged (up to {self.service.client.engine.merge_rows} a batch)")
        licence = "; Gemma terms of use apply to its weights" if name.startswith("gemma") else ""
        print(f"e3-node: serving causal LM {name!r} on {self.url} ({exits}; {d['kv_slots']} KV slots of "
              f"{d['max_len']} tokens{licence})", flush=True)
        print(f"e3-node: OpenAI /v1/completions and /v1/chat/completions (chat prompts: "
              f"{self.service.chat_format}), KServe /v2/models/{name}/generate and /generate_stream",
              flush=True)
        freeze_heap()               # before the first request, the demo's or a user's
        if demo:
            await self.demo()
        body = json.dumps({"model": name, "prompt": DEMO_PROMPT, "max_tokens": DEMO_TOKENS, "stream": True},
                          separators=(",", ":"))
        print("e3-node: stream a completion yourself:\n  "
              f"curl -sN {self.url}/v1/completions -H 'Content-Type: application/json' -d '{body}'", flush=True)
        print(f"e3-node: Ctrl-C stops it (running sequences finish first, for up to "
              f"{self.config.llm.drain_timeout_s:g} s)", flush=True)

    async def demo(self) -> None:
        """Stream the demo prompt over HTTP as a client would; print the answer and its exit layers."""
        import aiohttp
        body = {"model": self.service.name, "prompt": DEMO_PROMPT, "max_tokens": DEMO_TOKENS, "stream": True}
        pieces, streamed, t0 = [], [], time.monotonic()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.url}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    print(f"e3-node: the demo query failed ({resp.status}): {(await resp.json()).get('error')}",
                          flush=True)
                    return
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        streamed.append(choice["text"])
                        if choice["token"] is not None:
                            pieces.append((self.service.decode([choice["token"]]), choice["exit_layer"]))
                        if choice["finish_reason"]:
                            break
        seconds = time.monotonic() - t0
        text = "".join(streamed)
        L = self.service.client.engine.model.num_layers
        early = sum(layer < L for _, layer in pieces)
        print(f"e3-node: demo, streamed over HTTP ({len(pieces)} tokens in {seconds:.1f} s, greedy, "
              f"{early} left before layer {L}):\n  {DEMO_PROMPT!r} -> {text!r}\n"
              f"  each token with the decoder layers it ran ({L}: full depth):", flush=True)
        for at in range(0, len(pieces), DEMO_PER_LINE):
            print("    " + "  ".join(f"{t!r} {layer}" for t, layer in pieces[at:at + DEMO_PER_LINE]), flush=True)

    async def shutdown(self) -> None:
        """In reverse order of start; safe after a partial start."""
        if self.runner is not None:
            for site in self.runner.sites:
                await site.stop()
        if self.service is not None:
            if not await self.service.drain():
                print(f"e3-node: {self.service.client.held} sequence(s) still running after "
                      f"{self.config.llm.drain_timeout_s:g} s; they end with an error", flush=True)
            await self.service.close()
        if self.runner is not None:
            await self.runner.cleanup()


async def serve(config: E3Config, demo: bool = True) -> int:
    from transformers.utils import logging as hf_logging
    from .cli import run_until_stopped, stop_signals
    hf_logging.disable_progress_bar()      # the loader's per-tensor bars would bury the node's own lines
    stop = stop_signals()
    print(f"e3-node: starting (causal LM {config.model.path!r}; the first start builds its weights cache and "
          "trains its exit estimators: up to half an hour on 2 cores) ...", flush=True)
    node = LLMNode(config)
    try:
        return await run_until_stopped(node.start(demo), stop)
    finally:
        await node.shutdown()
        print("e3-node: stopped", flush=True)
