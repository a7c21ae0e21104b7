"""`bin/e3-node`: serve an early-exit model over HTTP and gRPC on this machine.

With no arguments it serves the built-in default model on 127.0.0.1 and
prints a query to paste. SIGINT/SIGTERM drain in-flight requests and stop.
`--model gemma3-270m` serves the early-exit causal LM instead (runtime/llm_node.py:
OpenAI /v1/completions and /v1/chat/completions, KServe generate; HTTP only).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import signal
import sys

from .config import E3Config
from e3.models.causal_lm import LLM_MODELS
from e3.models.errors import ModelError

from .errors import ConfigError, RuntimeError_
from .heap import freeze_heap
from .stop_watchdog import StopWatchdog

log = logging.getLogger("e3.node")
# held-out inputs the demo query sends, and how many it prints: enough that some meet an enabled
# ramp whichever ramps the plan enables (with 6 and 12, plans ending splits at ramps 1-2 or at ramp 2
# alone showed every demo text at the head)
DEMO_INPUTS, DEMO_SHOWN, DEMO_PER_REQUEST = 64, 6, 8


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e3-node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON config file (sections: model, workers, batching, server, replan, cluster)")
    p.add_argument("--model", help="model directory, 'default', 'digits', or the causal LM "
                   f"{', '.join(repr(m) for m in LLM_MODELS)} (overrides the config)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=int, help="KServe v2 gRPC port (default 8001; 0 turns gRPC off)")
    p.add_argument("--workers", type=int, help="CPU worker processes")
    p.add_argument("--threads", type=int, help="torch threads per CPU worker")
    p.add_argument("--inline", action="store_true", help="run the engine in the node process (no workers)")
    p.add_argument("--slo-ms", type=float, help="latency target in milliseconds")
    p.add_argument("--batch", type=int, help="fix the batch size instead of letting the planner choose")
    p.add_argument("--cuts", type=_cuts, help="fix the splits: comma-separated blocks a split ends "
                   "after, e.g. 0,2 ('' for one split); with --no-replan or --observe (the planner would choose)")
    p.add_argument("--no-replan", action="store_true", help="keep the first plan")
    p.add_argument("--observe", action="store_true", help="shadow mode: serve the --cuts/--batch plan, and "
                   "measure it, value it and show what the planner would run instead (GET /e3/plan)")
    p.add_argument("--cluster-token-file", help="the cluster's shared token (an owner-only file): this node "
                   "accepts members (a coordinator), or with --join is one")
    p.add_argument("--join", metavar="URL", help="be a member of the coordinator at http://HOST:PORT "
                   "(needs --cluster-token-file; --host is this member's own address)")
    p.add_argument("--no-demo-query", action="store_true",
                   help="do not send the example query to the node after it starts")
    p.add_argument("--kv-mode", choices=["copy", "exact"],
                   help="causal LM: the KV of layers an exited token skipped, projected (copy) or computed later (exact)")
    p.add_argument("--no-exits", action="store_true", help="causal LM: every token runs every layer")
    p.add_argument("--log-level", default=os.environ.get("E3_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def _cuts(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cuts takes comma-separated block numbers, got {text!r}") from None


# Options that size or plan the classifier pipeline; a causal LM has neither workers nor a plan yet.
CLASSIFIER_ONLY = (("workers", "--workers"), ("inline", "--inline"), ("slo_ms", "--slo-ms"),
                   ("batch", "--batch"), ("cuts", "--cuts"), ("no_replan", "--no-replan"),
                   ("observe", "--observe"))


def build_config(args: argparse.Namespace) -> E3Config:
    # validated once the flags are applied (below): a file may leave to them what it needs
    config = E3Config.from_file(args.config, validate=False) if args.config else E3Config()
    if (args.model or config.model.path) in LLM_MODELS:
        return _llm_config(config, args)
    if args.kv_mode is not None or args.no_exits:
        raise ConfigError("--kv-mode and --no-exits apply to the causal LM "
                          f"({', '.join(LLM_MODELS)}), not to model {config.model.path!r}")
    overrides = [("model", "path", args.model), ("server", "host", args.host), ("server", "port", args.port),
                 ("server", "grpc_port", args.grpc_port),
                 ("workers", "cpu_workers", args.workers), ("workers", "threads_per_worker", args.threads),
                 ("batching", "slo_ms", args.slo_ms), ("batching", "batch", args.batch),
                 ("batching", "cuts", args.cuts), ("cluster", "token_file", args.cluster_token_file),
                 ("cluster", "join", args.join)]
    for area, key, value in overrides:
        if value is not None:
            setattr(getattr(config, area), key, value)
    if args.inline:
        if args.workers is not None or args.threads is not None:
            raise ConfigError("--workers and --threads size worker processes; --inline runs one engine "
                              "in the node (torch's own thread count): drop one or the other")
        config.workers.mode = "inline"
    if args.no_replan and args.observe:
        raise ConfigError("--observe runs the planner beside a fixed plan; --no-replan runs none: drop one")
    if args.no_replan:
        config.replan.enabled = False
    if args.observe:
        config.replan.observe = True
    return config.validate()


def _llm_config(config: E3Config, args: argparse.Namespace) -> E3Config:
    """The config of a causal-LM node: the options that apply to it, a clear error for the others."""
    given = [flag for attr, flag in CLASSIFIER_ONLY if getattr(args, attr) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)} size or plan the classifier pipeline and do not apply to the "
                          f"causal LM {args.model or config.model.path!r} (it runs one engine thread; "
                          "--threads sets its torch threads)")
    if args.grpc_port:
        raise ConfigError("--grpc-port: the causal LM node serves HTTP only (the generate extension is HTTP)")
    overrides = [("model", "path", args.model), ("server", "host", args.host), ("server", "port", args.port),
                 ("llm", "threads", args.threads), ("llm", "kv_mode", args.kv_mode)]
    for area, key, value in overrides:
        if value is not None:
            setattr(getattr(config, area), key, value)
    if args.no_exits:
        config.llm.use_exits = False
    config.server.grpc_port = 0
    return config.validate()


def request_body(inputs: list) -> dict:
    """A v2 infer body for real inputs (strings for text models, flat numbers otherwise)."""
    if isinstance(inputs[0], str):
        return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(inputs)], "data": inputs}]}
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(inputs), len(inputs[0])],
                        "data": inputs}]}


def example_query(url: str, rt, inputs: list) -> str:
    """A ready-to-paste curl command using a real input of the served model."""
    body = json.dumps(request_body(inputs[:1]), separators=(",", ":"))
    return f"curl -s {url}/v2/models/{rt.meta.name}/infer -H 'Content-Type: application/json' -d '{body}'"


async def demo_query(url: str, rt, inputs: list, labels: list | None) -> None:
    """Query the node over HTTP, as a client would, and print what came back."""
    import aiohttp
    rows = []
    async with aiohttp.ClientSession() as session:
        for at in range(0, len(inputs), DEMO_PER_REQUEST):       # requests a client would send, each
            chunk = inputs[at:at + DEMO_PER_REQUEST]            # answered well within its deadline
            async with session.post(f"{url}/v2/models/{rt.meta.name}/infer", json=request_body(chunk)) as resp:
                answer = await resp.json()
            if resp.status != 200:
                print(f"e3-node: the example query failed ({resp.status}): {answer.get('error')}", flush=True)
                return
            out = {t["name"]: t["data"] for t in answer["outputs"]}
            rows += list(zip(out["label_name"], out["exit_point"], out["exit_block"]))
    counts = collections.Counter("the head" if e == rt.meta.head_exit else f"ramp {e}" for _, e, _ in rows)
    print(f"e3-node: example queries over HTTP ({len(inputs)} held-out inputs, {DEMO_PER_REQUEST} a request): left at "
          + ", ".join(f"{where} {n}" for where, n in sorted(counts.items())), flush=True)
    early = next((i for i, (_, e, _) in enumerate(rows) if e != rt.meta.head_exit), None)
    shown = list(range(min(DEMO_SHOWN, len(rows))))
    if early is not None and early not in shown:
        shown.append(early)           # one that left early, whichever ramps the plan enabled
    for i in shown:
        name, exit_point, block = rows[i]
        where = "the head" if exit_point == rt.meta.head_exit else f"ramp {exit_point}"
        truth = f" (true: {rt.meta.labels[labels[i]]})" if labels else ""
        print(f"  input {i}: predicted {name!r}{truth}, left at {where} after block {block} "
              f"of {rt.meta.num_blocks}", flush=True)


def stop_signals(watchdog: StopWatchdog | None = None) -> asyncio.Future:
    """A future that the first SIGINT or SIGTERM resolves with its number; later ones
    are ignored (the node is already stopping, and a second Ctrl-C must not cut a drain short).
    The first also arms `watchdog` (a StopWatchdog by default): a stop that hangs ends the process."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    watchdog = StopWatchdog() if watchdog is None else watchdog

    def on_signal(sig: int) -> None:
        if not stop.done():
            stop.set_result(sig)
            watchdog.arm()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def start(runtime, runner, grpc_server, config: E3Config, demo: bool, coordinator=None) -> None:
    """Start the runtime (and a coordinator's membership), then listen (HTTP, then gRPC if on),
    then show the user a query that works."""
    from .listener import make_site

    await runtime.start()
    if coordinator is not None:
        await coordinator.start()
    await runner.setup()
    host, port = config.server.host, config.server.port
    try:
        await make_site(runner, config.server).start()
    except OSError as exc:
        # The loop's own text ("error while attempting to bind on address (...)") buries the point.
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise RuntimeError_(f"cannot listen on {host}:{port}: {reason}") from exc
    if grpc_server is not None:
        await grpc_server.start()
    url = f"http://{host}:{runner.addresses[0][1]}"
    also = f" and gRPC {grpc_server.address}" if grpc_server is not None else ""
    p = runtime.placement
    if coordinator is not None:
        print(f"e3-node: coordinator: members join with --join {url} (GET {url}/e3/cluster lists them; "
              "keep this port off public networks)", flush=True)
    print(f"e3-node: serving model {runtime.meta.name!r} on {url}{also} "
          f"(epoch {runtime.epoch}, batch {p.batch}, splits {[list(s) for s in p.splits]})", flush=True)
    if runtime.planner is not None and runtime.planner.last_solve:
        # Say why: a stock plan (one split, exits at the head) is a decision, not a fault.
        print(f"e3-node: planner chose {runtime.planner.last_solve['choice']['reason']} "
              "(it re-plans from live exit rates; GET /e3/plan shows it)", flush=True)
    from .examples import load_examples
    inputs, labels = load_examples(runtime.model_dir, DEMO_INPUTS)
    freeze_heap()                   # before the first query, the demo's or a user's
    if demo:
        await demo_query(url, runtime, inputs, labels)
    print("e3-node: query it yourself:\n  " + example_query(url, runtime, inputs), flush=True)
    print("e3-node: Ctrl-C stops it (in-flight requests are drained first)", flush=True)


async def run_until_stopped(starting, stop: asyncio.Future) -> int:
    """Run the coroutine `starting` (a node's start), then serve until `stop`; a stop
    signal during start cancels the start (exit 128 + signal)."""
    starting = asyncio.ensure_future(starting)
    await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        print(f"e3-node: {signal.Signals(stop.result()).name} while starting; stopping ...", flush=True)
        return 128 + stop.result()
    starting.result()          # a failed start (a taken port, a bad model) raises here
    await stop
    print("e3-node: draining and stopping ...", flush=True)
    return 0


async def shutdown(runtime, runner, grpc_server, coordinator=None) -> None:
    """In reverse order of start: no new gRPC calls (those running get until their timeout
    to finish, the runtime still serving them), no new HTTP connections, then drain and
    close the runtime, then the HTTP server.

    Safe after a partial start: the runtime's rings (files in /dev/shm) and workers
    are released only by close(), so every way out of serve() comes through here."""
    if grpc_server is not None:
        await grpc_server.stop(grace_s=runtime.config.batching.timeout_ms / 1000 + 0.5)
    for site in runner.sites:
        await site.stop()
    await runtime.close()          # drains: members still run what is in flight on them
    if coordinator is not None:
        await coordinator.close()
    await runner.cleanup()


def cluster_parts(config: E3Config):
    """A coordinator's pool (its workers and its members') and the Coordinator to build on it, or
    (None, None) for a node alone; the token is read first, so a bad token file starts nothing."""
    if not config.cluster.enabled:
        return None, None
    from .cluster_auth import read_token
    from .coordinator import Coordinator
    from .remote_pool import ClusterPool
    from .worker_pool import LocalWorkerPool
    token = read_token(config.cluster.token_file)
    holder = {}
    pool = ClusterPool(lambda: LocalWorkerPool(
        config.workers, holder["rt"].metrics, model=holder["rt"].loaded,
        policy=(holder["rt"].policy.name, holder["rt"].policy.threshold)))

    def coordinator(runtime):
        holder["rt"] = runtime
        return Coordinator(config, runtime, pool, token)
    return pool, coordinator


async def serve(config: E3Config, demo: bool = True) -> int:
    from .http import make_app
    from .listener import make_runner
    from .runtime import Runtime

    if config.cluster.join is not None:
        from .member import serve_member
        return await serve_member(config)
    factory = None
    if config.replan.enabled:
        from .planner_actor import planner_factory as factory
    pool, make_coordinator = cluster_parts(config)
    runtime = Runtime(config, planner_factory=factory, pool=pool)
    coordinator = make_coordinator(runtime) if make_coordinator else None
    app = make_app(runtime)
    if coordinator is not None:
        coordinator.add_routes(app)
    runner = make_runner(app, config.server)
    grpc_server = None
    if config.server.grpc_port:
        from .grpc_server import GrpcServer
        grpc_server = GrpcServer(runtime, config.server.host, config.server.grpc_port)
    # Before start, not after: a first start may train the default model, and a
    # Ctrl-C then must still close what had started.
    stop = stop_signals()
    print(f"e3-node: starting ({config.workers.mode} workers, model {config.model.path!r}) ...", flush=True)
    try:
        code = await run_until_stopped(start(runtime, runner, grpc_server, config, demo, coordinator), stop)
    finally:
        await shutdown(runtime, runner, grpc_server, coordinator)
    print("e3-node: stopped", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = build_config(args)
        import uvloop
        if config.model.path in LLM_MODELS:
            from .llm_node import serve as serve_llm
            return uvloop.run(serve_llm(config, demo=not args.no_demo_query))
        return uvloop.run(serve(config, demo=not args.no_demo_query))
    except (ConfigError, RuntimeError_, ModelError) as exc:
        print(f"e3-node: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"e3-node: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
