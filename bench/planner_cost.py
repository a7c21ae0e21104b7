"""What E3's planning costs a node: the same plan served with the planner on and off, side by side.

    python3 -m bench.planner_cost                          # MiniLM 20:80 at 35 and 50 req/s, 2 repeats
    python3 -m bench.planner_cost --mix 80:20 --rates 60,90 --repeats 3
    python3 -m bench.planner_cost --model digits --workers 2x1 --stock    # and the stock node too

Per repeat, two real `e3-node` processes one after the other (bench/nodes.py):

1. `e3`: the planner on (forecasts, re-solves, the plan watch, ramp sampling);
   warmed at the first rate until it has planned, then probed at each rate;
2. `fixed`: the plan e3 ran at the end of its warm-up (splits, batch size,
   sampling fraction), with the planner off;
3. with `--stock`, `stock`: the goodput benchmark's stock node (no ramps, no
   sampling, no planner) at the batch size of e3's plan. When e3's plan is the
   stock plan, `fixed` against `stock` is what ramp sampling costs, and `e3`
   against `stock` is everything E3 adds to a plan that does not split.

Per probe (an open-loop Poisson load from bench/loadgen.py in its own process):
the share of requests answered within the SLO, p99 latency, and the CPU per
second of wall time of each process role (the node's event loop, its worker
processes, the planning child), read from /proc. The planning child's CPU is
what planning takes from the workers on a machine whose cores they fill; the
within-SLO share says what that costs the answers. Writes
bench/results/planner_cost.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .goodput import MIXES, ModelBench, Settings, environment, loadgen
from .nodes import Node, free_port, node_config
from .soak import _cpu_s, descendants

RESULTS = Path(__file__).parent / "results"
ROLES = ("node", "workers", "planning")
SYSTEMS = ("e3", "fixed", "stock")


@dataclass
class Options:
    model: str = "minilm"
    mix: str = "20:80"
    rates: list[float] = field(default_factory=lambda: [35.0, 50.0])
    repeats: int = 2
    probe_s: float = 15.0
    warm_s: float = 14.0
    slo_ms: float = 100.0
    workers: int = 1
    threads: int = 2
    stock: bool = False
    out: Path = RESULTS
    argv: list[str] = field(default_factory=list)


def role_of(cmdline: bytes) -> str:
    """A node's child process by its command line: the planning child, else a worker."""
    return "planning" if b"forecast_server" in cmdline else "workers"


def roles(node_pid: int) -> dict[int, str]:
    out = {node_pid: "node"}
    for pid in descendants(node_pid):
        try:
            out[pid] = role_of(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            continue
    return out


class CpuMeter:
    """CPU seconds per wall second of each role of one node's process tree, over a probe."""

    def __init__(self, node_pid: int):
        self.pids = roles(node_pid)
        self.t0, self.c0 = time.monotonic(), {p: _cpu_s(p, False) for p in self.pids}

    def per_s(self) -> dict[str, float]:
        dt = max(time.monotonic() - self.t0, 1e-9)
        out = {r: 0.0 for r in ROLES}
        for pid, role in self.pids.items():
            out[role] += max(0.0, _cpu_s(pid, False) - self.c0[pid]) / dt
        return {r: round(v, 3) for r, v in out.items()}


def fixed_config(e3_config: dict, placement: dict) -> dict:
    """The e3 node's config with its planner off and the plan it ran pinned (its ramp sampling,
    which the config leaves at its default, stays the same)."""
    splits = placement["splits"]
    cfg = json.loads(json.dumps(e3_config))
    cfg["batching"] |= {"batch": placement["batch"], "cuts": [last for _, last in splits[:-1]]}
    cfg["replan"] = {"enabled": False}
    cfg["server"]["port"] = free_port()
    return cfg


async def probe(node: Node, path: Path, rate: float, o: Options, seed: int) -> dict:
    meter = CpuMeter(node.proc.pid)
    r = await loadgen(node.url, node.model_name, path, rate, o.probe_s, o.slo_ms, seed)
    return {"rate": rate, "within_slo": round(r["good_fraction"], 4), "p99_ms": round(r["latency_ms"]["p99"], 1),
            "send_lag_ms_p99": round(r["send_lag_ms_p99"], 1), "cpu_per_s": meter.per_s()}


async def one_repeat(bench: ModelBench, path: Path, o: Options, rep: int) -> dict:
    e3_cfg = bench.config("e3")
    async with Node(e3_cfg, bench.logs) as node:
        await loadgen(node.url, node.model_name, path, o.rates[0], o.warm_s, o.slo_ms, 0)
        view = await node.get_json("/e3/plan")
        placement = view["placement"]
        e3 = [await probe(node, path, rate, o, 1 + rep) for rate in o.rates]
        end = (await node.get_json("/e3/plan"))["placement"]
    out = {"plan": {"splits": placement["splits"], "batch": placement["batch"]},
           "plan_at_end": {"splits": end["splits"], "batch": end["batch"]}, "e3": e3}
    configs = {"fixed": fixed_config(e3_cfg, placement)}
    if o.stock:
        configs["stock"] = bench.config("stock", placement["batch"])
    for system, cfg in configs.items():
        async with Node(cfg, bench.logs) as node:
            await loadgen(node.url, node.model_name, path, o.rates[0], bench.s.warm_s, o.slo_ms, 0)
            out[system] = [await probe(node, path, rate, o, 1 + rep) for rate in o.rates]
    return out


def systems_of(repeats: list[dict]) -> list[str]:
    return [s for s in SYSTEMS if s in repeats[0]]


def summarise(repeats: list[dict], rates: list[float]) -> list[dict]:
    """Per rate and system: median [min-max] of within-SLO share and of each role's CPU per second."""
    rows = []
    for i, rate in enumerate(rates):
        for system in systems_of(repeats):
            probes = [r[system][i] for r in repeats]
            row = {"rate": rate, "system": system, "within_slo": _spread([p["within_slo"] for p in probes]),
                   "p99_ms": _spread([p["p99_ms"] for p in probes])}
            row |= {f"cpu_{r}": _spread([p["cpu_per_s"][r] for p in probes]) for r in ROLES}
            rows.append(row)
    return rows


def _spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": min(xs), "max": max(xs)}


def _cell(s: dict, pct: bool = False) -> str:
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:g}")
    return f"{f(s['median'])} [{f(s['min'])}–{f(s['max'])}]"


def markdown(result: dict) -> str:
    env, o = result["environment"], result["options"]
    title = "# What planning costs a node: the same plan with the planner on (e3) and off (fixed)"
    if "stock" in systems_of(result["repeats"]):
        title += ", and the stock node (stock)"
    lines = [title, "",
             f"Command: `{result['command']}`  ",
             f"Date: {env['date']}; machine: {env['machine']}; Python {env['python']}, torch {env['torch']}; "
             f"wall time {result['wall_s'] / 60:.1f} min.  ",
             f"Model {o['model']}, {o['workers']} x {o['threads']} threads, mix {o['mix']}, {o['repeats']} repeats "
             f"({', then '.join(systems_of(result['repeats']))}, interleaved), "
             f"{o['probe_s']:g} s per probe, SLO {o['slo_ms']:g} ms.", "",
             "| rate (req/s) | system | within SLO | p99 ms | node CPU/s | workers CPU/s | planning child CPU/s |",
             "|---:|---|---|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['rate']:g} | {r['system']} | {_cell(r['within_slo'], True)} | {_cell(r['p99_ms'])} | "
                     f"{_cell(r['cpu_node'])} | {_cell(r['cpu_workers'])} | {_cell(r['cpu_planning'])} |")
    lines += ["", "Median [min–max] over the repeats. CPU/s: CPU seconds per second of wall time (1.0 = one "
              "core). The plan each repeat pinned for `fixed` (e3's at the end of its warm-up):", ""]
    lines += [f"- repeat {i + 1}: splits {r['plan']['splits']} at batch {r['plan']['batch']} "
              f"(e3 ran {r['plan_at_end']['splits']} at batch {r['plan_at_end']['batch']} at the end)"
              for i, r in enumerate(result["repeats"])]
    return "\n".join(lines) + "\n"


async def run(o: Options) -> dict:
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="e3-planner-cost-"))
    bench = ModelBench(o.model, Settings(models=[o.model], mixes=[o.mix], slo_ms=o.slo_ms, workers=o.workers,
                                         threads=o.threads), tmp)
    _, path = bench.mix_inputs(o.mix)
    repeats = []
    for rep in range(o.repeats):
        print(f"== repeat {rep + 1} of {o.repeats}", flush=True)
        repeats.append(await one_repeat(bench, path, o, rep))
        for system in systems_of(repeats):
            for p in repeats[-1][system]:
                print(f"   {system:5s} {p['rate']:6.1f} req/s: {p['within_slo']:.2%} within SLO, p99 {p['p99_ms']} ms, "
                      f"cpu/s {p['cpu_per_s']}", flush=True)
    return {"command": " ".join(["python3 -m bench.planner_cost", *o.argv]), "environment": environment(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items() if k != "argv"},
            "wall_s": round(time.monotonic() - t0, 1), "repeats": repeats, "summary": summarise(repeats, o.rates)}


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(prog="python3 -m bench.planner_cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("minilm", "digits"), default="minilm")
    p.add_argument("--mix", choices=sorted(MIXES), default="20:80")
    p.add_argument("--rates", default="35,50", help="comma-separated req/s")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--probe-s", type=float, default=15.0)
    p.add_argument("--workers", default="1x2", help="worker processes x threads each, e.g. 2x1")
    p.add_argument("--stock", action="store_true", help="also measure the stock node at e3's batch size")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    try:
        workers, threads = (int(x) for x in a.workers.lower().split("x"))
    except ValueError:
        p.error(f"--workers must be WORKERSxTHREADS such as 2x1, got {a.workers!r}")
    if workers < 1 or threads < 1:
        p.error(f"--workers needs at least one worker of one thread, got {a.workers!r}")
    try:
        rates = [float(x) for x in a.rates.split(",")]
    except ValueError:
        p.error(f"--rates must be comma-separated numbers, got {a.rates!r}")
    if not rates or any(r <= 0 for r in rates):
        p.error(f"--rates must be positive, got {a.rates!r}")
    if a.repeats < 1 or a.probe_s <= 0:
        p.error("--repeats must be at least 1 and --probe-s positive")
    return Options(a.model, a.mix, rates, a.repeats, a.probe_s, workers=workers, threads=threads, stock=a.stock,
                   out=Path(a.out), argv=argv)


def main(argv: list[str] | None = None) -> int:
    o = parse_args(sys.argv[1:] if argv is None else argv)
    result = asyncio.run(run(o))
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "planner_cost.json").write_text(json.dumps(result, indent=1))
    (o.out / "planner_cost.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
