"""Goodput of the sidecar path: E3 embedded as a library in an asyncio service, no HTTP.

    python3 -m bench.sidecar --config node.json --inputs inputs.json --start 200 \\
        --warm-rate 100 --warm-s 3 --probe-s 6 --bisect-steps 4 --slo-ms 100 --max-lag-ms 20

One fresh process (so that nothing of the benchmark driver shares its event
loop) starts `Runtime(config)` in-process, with the planner actor when
`replan.enabled` (as e3-node does), from the same config the HTTP system
runs (bench/nodes.py). It warms it at --warm-rate for --warm-s (e3's planner
observes the mix and re-plans), then runs the benchmark's own rate search
(bench.goodput.search). Each probe is an open-loop Poisson schedule
(bench.loadgen: the same schedule, input picks, seed and summary as the HTTP
generator) of `await rt.infer([x])` calls made on the runtime's own loop,
which is what a service embedding E3 does with its requests: the caller's
work, input encoding and the runtime's dispatch share one loop.

`x` is what the HTTP endpoint hands to `rt.infer` after parsing the JSON
body: a string for a text model, a flat list of numbers for a tensor model.
A request counts as answered (status 200) when `rt.infer` returns; when it
raises, it is failed with the HTTP status the endpoint would have answered
(e.g. 503 for a full admission queue, 504 past its deadline), never retried.
The pass rule is the HTTP path's (bench.goodput.judged): >= 99% answered
within the SLO, and a probe whose own send lag p99 exceeds --max-lag-ms
fails and is marked client-limited (here the "client" is the service's loop).
Unlike the HTTP generator, whose latency starts when its request leaves,
latency here starts at the scheduled arrival: the loop that runs the call
is the service's, so its lateness is the request's own delay.

Prints one JSON object on stdout (the search result, accuracy and agreement
at the goodput rate, start-up and wall seconds); probe lines go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict

from e3.models.errors import ModelError
from e3.runtime.config import E3Config
from e3.runtime.errors import RuntimeError_

from . import loadgen
from .goodput import judged, scores, search
from .nodes import batch_rows_of, mean_rows


def status_of(exc: BaseException) -> int:
    """The HTTP status the endpoint (runtime/http.py) would answer this failure with."""
    if isinstance(exc, RuntimeError_):
        return exc.status
    return 400 if isinstance(exc, ModelError) else 500


async def run_load(rt, data: dict, rate: float, duration_s: float, slo_ms: float, seed: int) -> loadgen.LoadResult:
    """One open-loop run of `rt.infer` calls, one input each, on this loop."""
    inputs = data["inputs"]
    times = loadgen.schedule(rate, duration_s, seed)
    picks = loadgen.pick_inputs(times, len(inputs), None, seed)
    records: list[tuple[int, float, tuple[int, int] | None]] = [None] * len(times)

    async def one(i: int, due: float) -> None:
        # Latency counts from the scheduled arrival, not from when this task got to run: here the
        # loop that starts it is the service's own, so a busy loop delays the request itself.
        try:
            [res] = await rt.infer([inputs[picks[i]]])
            records[i] = (200, (time.perf_counter() - due) * 1000, (res.label, res.exit_point))
        except Exception as exc:   # counted as failed, as a non-200 answer is on the HTTP path
            records[i] = (status_of(exc), (time.perf_counter() - due) * 1000, None)

    lags = await loadgen.open_loop(times, one)
    return loadgen.summarise(records, picks, data.get("labels"), rate, duration_s, slo_ms, lags, times,
                             data.get("reference"))


def batch_rows(rt) -> dict[str, tuple[float, float]]:
    return batch_rows_of(rt.metrics.render().decode())


async def probe(rt, data: dict, rate: float, seed: int, a: argparse.Namespace) -> dict:
    before = batch_rows(rt)
    r = await run_load(rt, data, rate, a.probe_s, a.slo_ms, seed)
    summary = asdict(r) | {"good_fraction": r.good_fraction}
    return judged(summary, mean_rows(before, batch_rows(rt)), a.max_lag_ms, out=sys.stderr)


async def measure(config: E3Config, data: dict, a: argparse.Namespace) -> dict:
    """Start the runtime in-process, warm it, search its goodput; the result."""
    from e3.runtime.runtime import Runtime
    factory = None
    if config.replan.enabled:
        from e3.runtime.planner_actor import planner_factory as factory
    t0 = time.perf_counter()
    async with Runtime(config, planner_factory=factory) as rt:
        startup_s = time.perf_counter() - t0
        await run_load(rt, data, a.warm_rate, a.warm_s, a.slo_ms, seed=0)
        t_search = time.perf_counter()
        result = await search(lambda rate, seed: probe(rt, data, rate, seed, a), a.start, a.bisect_steps,
                              grow=a.grow, shrink=a.shrink)
        search_s = time.perf_counter() - t_search
        plan = rt.planner.view()["plan"] if rt.planner is not None else None
        batch = rt.placement.batch
    return result | scores(result["at_goodput"]) | {
        "plan": plan, "batch": batch, "startup_s": round(startup_s, 2), "search_s": round(search_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.sidecar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the node config JSON of the system (bench/nodes.py)")
    p.add_argument("--inputs", required=True, help='JSON file {"inputs": [...], "labels": [...]} (as bench.loadgen)')
    p.add_argument("--start", type=float, required=True, help="first probed rate (req/s)")
    p.add_argument("--warm-rate", type=float, required=True)
    p.add_argument("--warm-s", type=float, default=3.0)
    p.add_argument("--probe-s", type=float, default=6.0)
    p.add_argument("--bisect-steps", type=int, default=4)
    p.add_argument("--grow", type=float, default=1.6, help="bracket: next rate after a pass, x this")
    p.add_argument("--shrink", type=float, default=0.5, help="bracket: next rate after a failure, x this")
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--max-lag-ms", type=float, default=20.0)
    a = p.parse_args(argv)
    if min(a.start, a.warm_rate, a.warm_s, a.probe_s, a.slo_ms, a.max_lag_ms) <= 0 or a.bisect_steps < 0:
        p.error("rates, durations and limits must be positive; --bisect-steps >= 0")
    if not (a.grow > 1 and 0 < a.shrink < 1):
        p.error("need --grow > 1 and 0 < --shrink < 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with open(a.config) as fh:
        config = E3Config.from_dict(json.load(fh))
    with open(a.inputs) as fh:
        data = json.load(fh)
    import uvloop   # the loop e3-node runs on, so that only HTTP differs between the two paths
    print(json.dumps(uvloop.run(measure(config, data, a))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
