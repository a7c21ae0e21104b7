"""The node's own CPU against its request rate: is it a cost per request, or a fixed cost plus one?

    python3 -m bench.node_cpu                        # digits, e3 node, rates 0..900 req/s (~2 min)
    python3 -m bench.node_cpu --model minilm --rates 0,40,80,120

One real `e3-node` (bench/nodes.py's config for the system, 1 worker of 2 threads
by default) and the open-loop load generator in its own process (bench/loadgen.py).
Per phase at a rate (0: no load at all), for `--repeats` rounds in turn:

- the node process's own CPU (user + system, from /proc; not its workers' nor its
  planning child's) over the phase's wall time: cores the node took;
- answered requests per second, and so CPU per request;
- for the e3 system, the planner's own estimate of the node's CPU per request
  at the end of the phase (`GET /e3/plan`, planner.overheads.node_ms_per_request).

A least-squares line through (rate, cores) splits the node's CPU into a fixed
share (cores at no load: timers, the pump, the planner) and a marginal cost per
request. Writes bench/results/node_cpu_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .goodput import environment, loadgen, write_inputs
from .nodes import SYSTEMS, Node, free_port, node_config
from .soak import _cpu_s
from .workloads import load_pools

RESULTS = Path(__file__).parent / "results"


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line through (x, y) points; None if the x do not spread."""
    xs = [x for x, _ in points]
    if len(points) < 2 or max(xs) - min(xs) <= 0:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


async def one_phase(node: Node, inputs: Path, rate: float, phase_s: float, slo_ms: float, seed: int) -> dict:
    cpu0, t0 = _cpu_s(node.proc.pid, False), time.monotonic()
    if rate > 0:
        r = await loadgen(node.url, node.model_name, inputs, rate, phase_s, slo_ms, seed)
    else:
        await asyncio.sleep(phase_s)
        r = {"ok": 0, "good": 0, "sent": 0, "send_lag_ms_p99": 0.0}
    wall = time.monotonic() - t0
    cores = (_cpu_s(node.proc.pid, False) - cpu0) / wall
    answered = r["ok"] / wall
    out = {"rate": rate, "wall_s": round(wall, 2), "answered_per_s": round(answered, 1), "cores": round(cores, 4),
           "ms_per_request": round(1000 * cores / answered, 4) if answered else None,
           "good_fraction": round(r["good"] / r["sent"], 4) if r["sent"] else None,
           "send_lag_ms_p99": r["send_lag_ms_p99"]}
    try:
        view = await node.get_json("/e3/plan")
        out["planner_ms_per_request"] = round(view["planner"]["problem"]["overheads"]["node_ms_per_request"], 4)
        out["planner_fit"] = view["planner"].get("node_cpu")
    except Exception:           # not an e3 node, or no solve yet: the column stays empty
        out["planner_ms_per_request"] = out["planner_fit"] = None
    per = f", {out['ms_per_request']:.3f} ms/request" if answered else ""
    print(f"  {rate:7.1f} req/s: node {cores:.3f} cores, answered {answered:7.1f}/s{per}", flush=True)
    return out


async def run(model: str, system: str, rates: list[float], phase_s: float, repeats: int, workers: int,
              threads: int, slo_ms: float) -> dict:
    pools = load_pools(model)
    with tempfile.TemporaryDirectory(prefix="e3-node-cpu-") as tmp:
        inputs = write_inputs(pools, pools.mix(0.8, 4000, seed=11), Path(tmp) / "inputs.json")
        config = node_config(system, str(pools.model_dir), pools.ramp_blocks, batch=None, slo_ms=slo_ms,
                             workers=workers, threads=threads, port=free_port())
        async with Node(config, Path(tmp) / "node.log") as node:
            await loadgen(node.url, node.model_name, inputs, max(rates) / 2, 3.0, slo_ms, 0)    # warm up
            phases = []
            for rep in range(repeats):
                for i, rate in enumerate(rates):
                    phases.append({"repeat": rep, **await one_phase(node, inputs, rate, phase_s, slo_ms, 10 * rep + i)})
    fit = fit_line([(p["answered_per_s"], p["cores"]) for p in phases])
    return {"model": model, "system": system, "workers": workers, "threads": threads, "phases": phases,
            "fixed_cores": round(fit[0], 4) if fit else None,
            "marginal_ms_per_request": round(1000 * fit[1], 4) if fit else None}


def render_md(r: dict, env: dict, command: str) -> str:
    lines = [f"# The node's own CPU against its request rate ({r['model']}, {r['system']} node)", "",
             f"Command: `{command}`  ", f"Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}, "
             f"aiohttp {env['aiohttp']}; {env['date']}  ",
             f"Node: {r['workers']} CPU worker(s) of {r['threads']} thread(s); load generator in its own process on "
             "the same cores. `node cores`: the node process's own CPU (not its workers', not its planning "
             "child's) over the phase's wall time.", "",
             f"Least-squares line through (answered/s, node cores): **{r['fixed_cores']} cores fixed + "
             f"{r['marginal_ms_per_request']} ms per request**. The planner's own fit of the node's CPU by term "
             f"(fixed, per request, per batch) at the end of the run: {r['phases'][-1].get('planner_fit')}.", "",
             "| round | offered req/s | answered /s | node cores | node ms per request | planner's estimate (ms) | "
             "within SLO | send lag p99 ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in r["phases"]:
        lines.append(f"| {p['repeat']} | {p['rate']:g} | {p['answered_per_s']:g} | {p['cores']:.3f} | "
                     f"{p['ms_per_request'] if p['ms_per_request'] is not None else '-'} | "
                     f"{p['planner_ms_per_request'] if p['planner_ms_per_request'] is not None else '-'} | "
                     f"{within(p)} | "
                     f"{p['send_lag_ms_p99']:.0f} |")
    return "\n".join(lines) + "\n"


def within(p: dict) -> str:
    return "-" if p["good_fraction"] is None else f"{p['good_fraction']:.1%}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.node_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", choices=["digits", "minilm"])
    p.add_argument("--system", default="e3", choices=SYSTEMS)
    p.add_argument("--rates", default="0,150,300,600,900", help="comma-separated req/s; 0 is no load")
    p.add_argument("--phase-s", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    try:
        a.rates = [float(x) for x in a.rates.split(",") if x.strip()]
    except ValueError:
        p.error(f"--rates must be numbers separated by commas, got {a.rates!r}")
    if not a.rates or any(r < 0 for r in a.rates) or max(a.rates) <= 0:
        p.error(f"--rates needs at least one positive rate and none negative, got {a.rates}")
    for name in ("phase_s", "repeats", "workers", "threads"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    import uvloop
    r = uvloop.run(run(a.model, a.system, a.rates, a.phase_s, a.repeats, a.workers, a.threads, a.slo_ms))
    env, command = environment(), "python3 -m bench.node_cpu " + shlex.join(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"node_cpu_{a.model}"
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "environment": env, **r}, indent=1))
    stem.with_suffix(".md").write_text(render_md(r, env, command))
    print(f"bench.node_cpu: {r['fixed_cores']} cores fixed + {r['marginal_ms_per_request']} ms per request; "
          f"wrote {stem.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
