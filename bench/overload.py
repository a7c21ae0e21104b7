"""Overload: does goodput hold past capacity, and does the node recover?

    python3 -m bench.overload            # the digits model and MiniLM (~6 min)
    python3 -m bench.overload --quick    # shorter probes and phases (~2 min)

Per model, one real `e3-node` process with its default settings (bench/nodes.py)
and an open-loop Poisson load generator in its own process (bench/loadgen.py):

1. capacity: the highest rate with 99% of requests answered within the SLO,
   searched as bench/goodput.py does (bracket, then bisect);
2. phases at 1x, 2x and 3x that rate, then 1x again ("after": recovery).
   Per phase: goodput (answers within the SLO per second), refused (503),
   late (200 after the SLO) and error counts from the client; the node's own
   counts from its /metrics (admitted, answered within the SLO, refused by the
   HTTP gate and by the runtime); node and worker RSS read from /proc every
   half second (start, peak, end).

The load client shares the machine with the node: a phase whose generator fell
behind its schedule (send lag p99 above --max-lag-ms) is marked client-limited,
and a run during which other processes took more than 15% of the machine's CPU
is marked noisy (bench/soak.py's CpuShare). Writes bench/results/overload.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from .goodput import environment, judged, loadgen, search, write_inputs
from .nodes import Node, NodeError, free_port, parse_cpus
from .soak import NOISY_SHARE, CpuShare, tree_rss
from .workloads import load_pools

RESULTS = Path(__file__).parent / "results"
PHASES = (("1x", 1.0), ("2x", 2.0), ("3x", 3.0), ("after", 1.0))


@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: ["digits", "minilm"])
    slo_ms: float = 100.0
    warm_s: float = 4.0
    probe_s: float = 5.0
    phase_s: float = 15.0
    bisect_steps: int = 2
    max_probes: int = 8
    capacity: float | None = None     # known capacity: skip the search, run the phases at it
    max_lag_ms: float = 20.0
    start: dict = field(default_factory=lambda: {"digits": 400.0, "minilm": 60.0})
    node_cpus: frozenset | None = None     # pinned: the node and its workers on these cores only
    client_cpus: frozenset | None = None   # the load generator on these (disjoint from the node's)
    out: Path = RESULTS
    argv: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, **kw) -> "Settings":
        return cls(**{"warm_s": 2.0, "probe_s": 3.0, "phase_s": 6.0, "bisect_steps": 1, **kw})


def node_counts(text: str) -> dict[str, float]:
    """The node's counters that say what happened to requests, from its Prometheus text."""
    out = {}
    for m in re.finditer(r'^(e3_inputs_total|e3_within_slo_total|e3_http_refused_total|e3_failures_total)'
                         r'(?:\{\w+="([^"]*)"\})? ([0-9.e+-]+)$', text, re.M):
        out[m.group(1).removeprefix("e3_").removesuffix("_total") + (f":{m.group(2)}" if m.group(2) else "")] = \
            float(m.group(3))
    return out


async def scrape(node: Node) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(node.url + "/metrics") as r:
        return node_counts(await r.text())


def delta(before: dict, after: dict) -> dict[str, int]:
    return {k: int(v - before.get(k, 0.0)) for k, v in sorted(after.items()) if v - before.get(k, 0.0)}


async def watch_rss(node_pid: int, samples: list[dict], every_s: float = 0.5) -> None:
    while True:
        samples.append(tree_rss(node_pid))
        await asyncio.sleep(every_s)


def rss_summary(samples: list[dict]) -> dict:
    nodes = [s["node"] for s in samples if s["node"] is not None]
    workers = [sum(v for v in s["workers"].values() if v) for s in samples]
    return {"node_mb": {"start": round(nodes[0], 1), "peak": round(max(nodes), 1), "end": round(nodes[-1], 1)},
            "workers_mb_peak": round(max(workers), 1)} if nodes else {}


async def phase(node: Node, inputs: Path, name: str, rate: float, s: Settings, seed: int) -> dict:
    """One phase at `rate`: the client's and the node's counts, RSS, and how busy the machine was."""
    before, samples, cpu = await scrape(node), [], CpuShare()
    watcher = asyncio.create_task(watch_rss(node.proc.pid, samples))
    try:
        r = await loadgen(node.url, node.model_name, inputs, rate, s.phase_s, s.slo_ms, seed, s.client_cpus)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    samples.append(tree_rss(node.proc.pid))
    node_side = delta(before, await scrape(node))
    statuses = r["statuses"]
    out = {"phase": name, "rate": round(rate, 1), "sent": r["sent"], "goodput": round(r["good"] / s.phase_s, 1),
           "good_fraction": round(r["good_fraction"], 4), "refused": statuses.get("503", 0),
           "late": r["ok"] - r["good"],
           "errors": sum(n for k, n in statuses.items() if k not in ("200", "503")), "statuses": statuses,
           "latency_ms": r["latency_ms"], "send_lag_ms_p99": r["send_lag_ms_p99"],
           "client_limited": r["send_lag_ms_p99"] > s.max_lag_ms, "foreign_cpu": round(cpu.foreign(), 3),
           "node": node_side, **rss_summary(samples)}
    print(f"  {name:>5} {rate:7.1f} req/s: goodput {out['goodput']:7.1f}/s ({out['good_fraction']:.1%}), "
          f"{out['refused']} refused, {out['late']} late, {out['errors']} errors, p99 {r['latency_ms']['p99']:.0f} ms, "
          f"lag p99 {r['send_lag_ms_p99']:.0f} ms, node {out.get('node_mb', {}).get('peak', 0):.0f} MB peak, "
          f"other CPU {out['foreign_cpu']:.0%}", flush=True)
    return out


async def run_model(which: str, s: Settings, tmp: Path) -> dict:
    pools = load_pools(which)
    inputs = write_inputs(pools, pools.mix(0.8, 4000, seed=11), tmp / f"{which}.json")
    config = {"model": {"path": str(pools.model_dir)}, "server": {"port": free_port()}}
    if s.node_cpus is not None:      # one worker with a thread per core it may use, at most its default 2
        config["workers"] = {"threads_per_worker": min(2, len(s.node_cpus))}
    print(f"== {which}: capacity search", flush=True)
    async with Node(config, tmp / f"{which}-node.log", cpus=s.node_cpus) as node:
        await loadgen(node.url, node.model_name, inputs, s.start[which] / 2, s.warm_s, s.slo_ms, 0, s.client_cpus)

        async def probe(rate: float, seed: int) -> dict:
            r = await loadgen(node.url, node.model_name, inputs, rate, s.probe_s, s.slo_ms, seed, s.client_cpus)
            return judged(r, {}, s.max_lag_ms)
        if s.capacity is not None:
            found = {"goodput": s.capacity, "probes": [], "client_limited": False, "given": True}
        else:
            found = await search(probe, s.start[which], s.bisect_steps, max_probes=s.max_probes)
        capacity = found["goodput"]
        if not capacity:
            raise NodeError(f"{which}: no probed rate met the SLO (lowest tried "
                            f"{min(p['rate'] for p in found['probes']):.1f} req/s)")
        print(f"== {which}: capacity {capacity:.1f} req/s; overload phases", flush=True)
        phases = [await phase(node, inputs, name, k * capacity, s, 100 + i) for i, (name, k) in enumerate(PHASES)]
    return summarise(which, node.model_name, capacity, found, phases)


def summarise(which: str, model: str, capacity: float, found: dict, phases: list[dict]) -> dict:
    by = {p["phase"]: p for p in phases}
    base = by["1x"]["goodput"] or None
    start_rss = by["1x"].get("node_mb", {}).get("start")
    peak_rss = max((p.get("node_mb", {}).get("peak", 0.0) for p in phases), default=0.0)
    return {"bench_model": which, "model": model, "capacity": round(capacity, 1),
            "capacity_given": bool(found.get("given")),
            "capacity_probes": [{k: p[k] for k in ("rate", "good_fraction", "send_lag_ms_p99", "passed")}
                                for p in found["probes"]],
            "capacity_client_limited": found["client_limited"],
            "goodput_ratio": {name: round(by[name]["goodput"] / base, 3) if base else None for name, _ in PHASES},
            "recovered": by["after"]["good_fraction"] >= 0.99,
            "node_rss_growth_mb": round(peak_rss - start_rss, 1) if start_rss else None,
            "client_limited": any(p["client_limited"] for p in phases),
            "noisy": any(p["foreign_cpu"] > NOISY_SHARE for p in phases), "phases": phases}


def placement_line(s: Settings) -> str:
    """Where the node and the client ran, as the results say it."""
    if s.node_cpus is None:
        return ("Node: `e3-node` defaults (1 CPU worker of 2 threads, replanning on), load client in its own process "
                "on the same cores; goodput = answers within the 100 ms SLO per second.")
    client = "every core" if s.client_cpus is None else f"cores {sorted(s.client_cpus)}"
    return (f"Node: `e3-node` defaults but pinned to cores {sorted(s.node_cpus)} with its workers (1 CPU worker of "
            f"{min(2, len(s.node_cpus))} thread(s), replanning on); load client in its own process on {client}; "
            "goodput = answers within the 100 ms SLO per second.")


def node_within(counts: dict) -> str:
    """The node's own share of admitted inputs answered within the SLO (its /metrics), as text."""
    admitted = counts.get("inputs:admitted", 0)
    return f"{counts.get('within_slo', 0) / admitted:.1%}" if admitted else "-"


def render_md(results: list[dict], env: dict, command: str, s: Settings) -> str:
    lines = ["# Overload: goodput at 1x, 2x, 3x capacity and after", "",
             f"Command: `{command}`  ", f"Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}, "
             f"aiohttp {env['aiohttp']}; {env['date']}  ", placement_line(s), ""]
    for r in results:
        if "error" in r:
            lines += [f"## {r['bench_model']}: NOT MEASURED", "", "The node failed: " + r["error"].replace("\n", " ")[:600], ""]
            continue
        cond = []
        if r["noisy"]:
            cond.append("NOISY (other processes took up to "
                        f"{max(p['foreign_cpu'] for p in r['phases']):.0%} of the machine's CPU)")
        if r["client_limited"]:
            cond.append("CLIENT-LIMITED in " + ", ".join(p["phase"] for p in r["phases"] if p["client_limited"])
                        + " (the generator fell behind its schedule)")
        lines += [f"## {r['model']} ({r['bench_model']}): capacity {r['capacity']:g} req/s"
                  f"{' (given with --capacity, not searched)' if r.get('capacity_given') else ''}", "",
                  f"Goodput at 3x / at 1x: **{r['goodput_ratio']['3x']}**; recovered after: "
                  f"{'yes' if r['recovered'] else 'NO'}; node RSS peak over its start: {r['node_rss_growth_mb']} MB. "
                  f"Conditions: {'; '.join(cond) or 'machine otherwise quiet, client kept its schedule'}.", "",
                  "| phase | offered req/s | goodput /s | ratio | within SLO | refused 503 | late | errors | "
                  "p99 ms (200s) | send lag p99 ms | node admitted | node: admitted within SLO | node refused (gate) | "
                  "node MB start/peak/end | other CPU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for p in r["phases"]:
            n, mb = p["node"], p.get("node_mb", {})
            gate = sum(v for k, v in n.items() if k.startswith("http_refused"))
            lines.append(f"| {p['phase']} | {p['rate']:g} | {p['goodput']:g} | {r['goodput_ratio'][p['phase']]} | "
                         f"{p['good_fraction']:.1%} | {p['refused']} | {p['late']} | {p['errors']} | "
                         f"{p['latency_ms']['p99']:.0f} | {p['send_lag_ms_p99']:.0f} | {n.get('inputs:admitted', 0)} | "
                         f"{node_within(n)} | {gate} | {mb.get('start')}/{mb.get('peak')}/{mb.get('end')} | {p['foreign_cpu']:.0%} |")
        lines.append("")
    return "\n".join(lines)


async def run_all(s: Settings) -> list[dict]:
    """Every model in turn; one whose node failed is recorded with its error and the rest still run."""
    out = []
    with tempfile.TemporaryDirectory(prefix="e3-overload-") as tmp:
        for which in s.models:
            try:
                out.append(await run_model(which, s, Path(tmp)))
            except NodeError as exc:
                print(f"bench.overload: {which}: {exc}", file=sys.stderr, flush=True)
                out.append({"bench_model": which, "error": str(exc)})
    return out


def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="bench.overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter probes and phases (~2 min)")
    p.add_argument("--models", help="comma-separated: digits,minilm (default both)")
    p.add_argument("--phase-s", type=float, help="seconds per overload phase")
    p.add_argument("--probe-s", type=float, help="seconds per capacity probe")
    p.add_argument("--capacity", type=float, help="skip the search: run the phases at this rate as 1x")
    p.add_argument("--max-probes", type=int, help="capacity probes at most (default 8)")
    p.add_argument("--start", help="first probed rate per model, e.g. digits=400,minilm=60")
    p.add_argument("--node-cpus", help="pin the node and its workers to these cores, e.g. 0 or 0-1")
    p.add_argument("--client-cpus", help="pin the load generator to these cores, e.g. 1 (not the node's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    s = Settings.quick() if a.quick else Settings()
    s.out, s.argv = a.out, argv
    if a.models:
        s.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for name in ("phase_s", "probe_s"):
        if getattr(a, name) is not None:
            if getattr(a, name) <= 0:
                p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
            setattr(s, name, getattr(a, name))
    if a.capacity is not None:
        if a.capacity <= 0:
            p.error(f"--capacity must be positive, got {a.capacity}")
        s.capacity = a.capacity
    if a.max_probes is not None:
        if a.max_probes < 1:
            p.error(f"--max-probes must be at least 1, got {a.max_probes}")
        s.max_probes = a.max_probes
    if a.start:
        for item in a.start.split(","):
            k, _, v = item.partition("=")
            s.start[k.strip()] = float(v)
    try:
        s.node_cpus = parse_cpus(a.node_cpus) if a.node_cpus else None
        s.client_cpus = parse_cpus(a.client_cpus) if a.client_cpus else None
    except ValueError as exc:
        p.error(str(exc))
    if s.node_cpus and s.client_cpus and s.node_cpus & s.client_cpus:
        p.error(f"--node-cpus and --client-cpus share cores {sorted(s.node_cpus & s.client_cpus)}")
    unknown = [m for m in s.models if m not in s.start]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {sorted(s.start)}")
    return s


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s = parse_args(argv)
    import uvloop
    t0 = time.monotonic()
    results = uvloop.run(run_all(s))
    env = environment()
    command = "python3 -m bench.overload " + shlex.join(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "overload.json").write_text(json.dumps({"command": command, "environment": env,
                                                     "wall_s": round(time.monotonic() - t0, 1),
                                                     "settings": {k: sorted(v) if isinstance(v, frozenset) else v
                                                                  for k, v in asdict(s).items()
                                                                  if k not in ("out", "argv")},
                                                     "results": results}, indent=1))
    (s.out / "overload.md").write_text(render_md(results, env, command, s))
    for r in results:
        if "error" in r:
            continue
        print(f"bench.overload: {r['bench_model']}: capacity {r['capacity']:g} req/s, goodput 3x/1x "
              f"{r['goodput_ratio']['3x']}, recovered {r['recovered']}{', NOISY' if r['noisy'] else ''}"
              f"{', client-limited' if r['client_limited'] else ''}", flush=True)
    print(f"bench.overload: wrote {s.out / 'overload.md'} ({time.monotonic() - t0:.0f} s)", flush=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
