"""GPU goodput: stock vs ee-batch vs e3 on a BERT-base-sized EE model, 80:20 and 20:80 mixes.

    python3 -m bench.gpu.goodput_gpu --out bench/results/gpu            # on a GPU (~4 min)
    python3 -m bench.gpu.goodput_gpu --out /tmp/x --dry-run              # CPU: wiring only, tiny model

TIMING ONLY: random weights, exits replayed from the CPU MiniLM pattern
(bench/gpu/replay_model.py says how, and why not the real MiniLM).

Every system is a real `e3-node` process with one CUDA worker (runtime
config workers.devices), loaded by the open-loop HTTP load generator, and
searched for its goodput as bench/goodput.py does (but scored on the probe
at goodput, with no separate accuracy run). The order puts a full 80:20
triple first, and results are written after every measurement, so a run cut
short keeps what it measured; a job that would not fit the time left
(--budget-s) is recorded as skipped.

Beside each measured goodput stands the cost model's prediction
(planner/cost_model.py), from the e3 node's profile of this GPU and the
overheads it measured, at the mix's exit pattern:
- e3: the running plan, and what the node's planner itself predicted for it;
- stock / ee-batch at batch b: their plan valued the same way
  (bench/goodput.py baseline_value).

The dry run builds the model at a tiny size on the CPU, loads it through the
registry, checks the replayed exits, validates every node config, writes the
inputs, and writes the result files with no measurement; it starts no node
(the e2e tests cover nodes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.goodput import (ModelBench, Settings, _system_summary, baseline_batch, baseline_value, environment,
                           hop_transfer, loadgen, probe, profile_from_view, scores, search)
from bench.nodes import Node
from bench.workloads import Pools

from .replay_model import LABEL, Size, build

GPU_MIXES = ("80:20", "20:80")
# Each (mix, system) in the order measured: the 80:20 triple first; stock's batch does not depend
# on the mix, so its two mixes share one node.
JOBS = (("80:20", "e3"), ("80:20", "stock"), ("20:80", "stock"), ("80:20", "ee-batch"),
        ("20:80", "e3"), ("20:80", "ee-batch"))
JOB_S = 35.0                  # about what one job takes (node start, warm-up, search): skip it if less is left


class ReplayPools(Pools):
    """Pools of the replay model: "easy" is the table's earliest exit (MiniLM's first ramp, mapped by
    depth onto a later ramp of the bigger model), "hard" the head."""

    def easy(self) -> list[int]:
        first = min(self.exit_point)
        return [i for i, e in enumerate(self.exit_point) if e == first]


def pools_from(model_dir: Path, replay: dict) -> ReplayPools:
    return ReplayPools(model_dir, "bert-base-replay", replay["inputs"], replay["labels"], replay["head"],
                       replay["exit_point"], replay["num_blocks"], replay["ramp_blocks"])


class GpuBench(ModelBench):
    """ModelBench on the replay model, with its workers on `s.device`."""

    def __init__(self, s: Settings, tmp: Path, pools: ReplayPools):
        self.which, self.s, self.tmp, self.pools = "bert-base-replay", s, tmp, pools
        self.logs = tmp / "gpu-nodes.log"

    def config(self, system: str, batch: int | None = None) -> dict:
        cfg = super().config(system, batch)
        cfg["workers"] |= {"devices": [self.s.device] * self.s.workers}
        return cfg

    async def run_e3(self, path: Path, picks: list[int]) -> tuple[dict, dict]:
        """ModelBench.run_e3, searched without the separate accuracy run (see `searched`)."""
        async with Node(self.config("e3"), self.logs) as node:
            view = await node.get_json("/e3/plan")
            start = self.start_rate({"picks": picks}, profile_from_view(view))
            await loadgen(node.url, node.model_name, path, start, self.s.e3_warm_s, self.s.slo_ms, 0)
            result = await searched(node, path, start, self.s)
            view = await node.get_json("/e3/plan")
            return result | {"plan": view["planner"]["plan"], "batch": view["placement"]["batch"]}, view


async def searched(node: Node, path: Path, start: float, s: Settings) -> dict:
    """The goodput search, scored on the probe at goodput itself: the replay model's "accuracy" only checks
    that answers reach their requests, which is not worth bench/goodput.py's extra fixed-rate run here."""
    result = await search(lambda rate, seed: probe(node, path, rate, s, seed), start, s.bisect_steps)
    return result | scores(result["at_goodput"])


def settings(out: Path, device: str, probe_s: float, slo_ms: float) -> Settings:
    """Short probes: the whole step has about four minutes of GPU time."""
    return Settings(models=["bert-base-replay"], mixes=list(GPU_MIXES), slo_ms=slo_ms, probe_s=probe_s, warm_s=1.5,
                    e3_warm_s=6.0,
                    max_start=1200.0, bisect_steps=1, score_rate=40.0, score_s=2.0, switch=False, sidecar=(),
                    out=out, device=device, tag="gpu", threads=2)


def predicted(view: dict, system: str, batch: int, block_survival: list[float], pools: Pools) -> dict:
    """The cost model's goodput for `system`'s plan at `batch` on this mix (see the module docstring)."""
    from e3.planner.cost_model import value
    from e3.planner.plan import Plan
    from e3.planner.problem import Problem
    planner = view["planner"]
    if not planner.get("problem") or (system == "e3" and not planner.get("plan")):
        choice = (planner.get("last_solve") or {}).get("choice") or {}
        return {"goodput": None, "why": choice.get("reason") or "the planner has no plan"}
    problem = Problem.from_json(planner["problem"])
    survival = [block_survival[b + 1] for b in pools.ramp_blocks]     # past ramp k = runs the block after it
    problem = dataclasses.replace(problem, survival=survival)
    out = {"overheads": problem.overheads.to_json(), "utilisation": problem.utilisation}
    if system == "e3":
        plan = Plan.from_json(planner["plan"])
        v = value(problem, plan)
        return out | {"goodput": round(v.goodput, 1), "latency_ms": round(v.latency_s * 1000, 2),
                      "node_prediction": (planner.get("prediction") or {}).get("goodput"),
                      "splits": plan.splits, "batch": plan.batch}
    return out | {"goodput": round(baseline_value(problem, system, batch), 1)}


class Record:
    """The results so far, rewritten after every job."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.data = out, {**meta, "label": LABEL, "runs": {}, "skipped": [], "errors": []}

    def put(self, mix: str, system: str, result: dict) -> None:
        self.data["runs"].setdefault(mix, {})[system] = result
        self.write()

    def write(self) -> None:
        self.data["ratios"] = {mix: ratios(r) for mix, r in self.data["runs"].items()}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "goodput_gpu.json").write_text(json.dumps(self.data, indent=1))
        (self.out / "goodput_gpu.md").write_text(markdown(self.data))


def ratios(systems: dict) -> dict:
    g = {k: v.get("goodput") for k, v in systems.items()}
    return {f"e3/{b}": round(g["e3"] / g[b], 3) if g.get("e3") and g.get(b) else None for b in ("stock", "ee-batch")}


def markdown(d: dict) -> str:
    env = d.get("environment", {})
    lines = [f"# GPU goodput: {d['model']}", "", f"**{LABEL}.**", "",
             f"Command: `{d['command']}`  ", f"Machine: {env.get('machine')}  ",
             f"Python {env.get('python')}, torch {env.get('torch')}; date {env.get('date')}  ",
             f"Model: {d['model_size']}; replayed exits match the table for {d['replay_match']:.1%} of inputs; "
             f"SLO {d['slo_ms']} ms; one worker on {d['device']}", "",
             "| mix | system | batch | goodput (req/s) | planner's prediction (req/s) | p99 at goodput (ms) | "
             "client-limited |", "|---|---|---|---|---|---|---|"]
    for mix, systems in d["runs"].items():
        for name, r in systems.items():
            p = r.get("predicted") or {}
            p99 = (r.get("latency_ms") or {}).get("p99")
            lines.append(f"| {mix} | {name} | {r.get('batch')} | {r.get('goodput')} | {p.get('goodput')} | "
                         f"{'' if p99 is None else round(p99, 1)} | {r.get('client_limited')} |")
    lines += ["", "Ratios: " + "; ".join(f"{mix}: " + ", ".join(f"{k} {v}" for k, v in r.items())
                                      for mix, r in d["ratios"].items())]
    if d["skipped"]:
        lines += ["", "Skipped (out of time): " + ", ".join(f"{m} {s}" for m, s in d["skipped"])]
    if d["errors"]:
        lines += ["", "Errors:", *[f"- {e}" for e in d["errors"]]]
    return "\n".join(lines) + "\n"


def parse_jobs(text: str | None) -> tuple[tuple[str, str], ...]:
    """"80:20/e3,80:20/ee-batch" -> those jobs in JOBS' order (a rerun of what a cut-short run skipped)."""
    if not text:
        return JOBS
    wanted = {tuple(j.strip().split("/", 1)) for j in text.split(",")}
    unknown = wanted - set(JOBS)
    if unknown:
        raise SystemExit(f"goodput_gpu: unknown jobs {sorted(unknown)}; known: "
                         f"{', '.join(f'{m}/{s}' for m, s in JOBS)}")
    return tuple(j for j in JOBS if j in wanted)


async def measure(bench: GpuBench, record: Record, deadline: float, jobs=JOBS) -> None:
    views, picks, nodes = {}, {}, {}
    for mix in GPU_MIXES:
        picks[mix] = bench.mix_inputs(mix)[0]
    try:
        for mix, system in jobs:
            if time.monotonic() + JOB_S > deadline:
                record.data["skipped"].append([mix, system])
                record.write()
                continue
            try:
                await job(bench, record, mix, system, views, picks[mix], nodes)
            except Exception as exc:         # one job's failure must not cost the others: recorded, and on
                import traceback         # to the next job
                traceback.print_exc()
                record.data["errors"].append(f"{mix} {system}: {type(exc).__name__}: {exc}"[:2000])
                record.write()
    finally:
        for node in nodes.values():
            await node.stop()


async def job(bench: GpuBench, record: Record, mix: str, system: str, views: dict, picks: list[int],
              nodes: dict) -> None:
    s, path = bench.s, bench.inputs_path(mix)
    surv = bench.pools.block_survival(picks)
    print(f"== {mix}: {system}", flush=True)
    if system == "e3":
        for key in list(nodes):                                 # one node at a time on the GPU
            await nodes.pop(key).stop()
        result, view = await bench.run_e3(path, picks)
        views[mix] = view
        summary = _system_summary(result) | {"transfer": hop_transfer(view)}
        record.put(mix, system, summary | {"predicted": predicted(view, "e3", result["batch"], surv, bench.pools)})
        return
    view = views.get(mix) or next(iter(views.values()), None)
    if view is None:
        raise RuntimeError("no e3 run measured this GPU's profile, which the baselines' batch size needs")
    profile = profile_from_view(view)
    b = baseline_batch(view, bench.pools, picks, system)
    for key in [k for k in nodes if k != (system, b)]:         # one node at a time on the GPU
        await nodes.pop(key).stop()
    if (system, b) not in nodes:
        node = Node(bench.config(system, b), bench.logs)
        await node.start()
        nodes[(system, b)] = node
    node = nodes[(system, b)]
    start = bench.start_rate({"picks": picks}, profile)
    await loadgen(node.url, node.model_name, path, start / 2, s.warm_s, s.slo_ms, 0)
    result = await searched(node, path, start, s) | {"batch": b}
    record.put(mix, system, _system_summary(result) | {"predicted": predicted(view, system, b, surv, bench.pools)})


def dry_checks(bench: GpuBench, replay: dict) -> list[str]:
    """What the dry run can check without a node; the problems found."""
    from e3.models.registry import load_model
    from e3.runtime.config import E3Config
    problems = []
    loaded = load_model(bench.pools.model_dir, "cpu")
    if loaded.model.meta.num_blocks != replay["num_blocks"]:
        problems.append(f"the model has {loaded.model.meta.num_blocks} blocks, the replay {replay['num_blocks']}")
    if replay["match"] < 0.95:
        problems.append(f"replayed exits match the table for only {replay['match']:.1%} of inputs")
    if not bench.pools.easy() or not bench.pools.hard():
        problems.append(f"the pools lack easy ({len(bench.pools.easy())}) or hard ({len(bench.pools.hard())}) inputs")
    for system in ("e3", "stock", "ee-batch"):
        cfg = bench.config(system, None if system == "e3" else 8)
        E3Config.from_dict(cfg).validate()
        if cfg["workers"]["devices"] != [bench.s.device]:
            problems.append(f"{system}'s workers run on {cfg['workers']['devices']}, not {bench.s.device}")
    for mix in GPU_MIXES:
        path = bench.mix_inputs(mix)[1]
        if len(json.loads(path.read_text())["inputs"]) != 4000:
            problems.append(f"the {mix} inputs file is short")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.gpu.goodput_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu", help="folder for goodput_gpu.json and .md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, no node: wiring only")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--budget-s", type=float, default=230.0, help="measurement jobs stop starting after this")
    p.add_argument("--probe-s", type=float, default=2.0)
    p.add_argument("--slo-ms", type=float, default=100.0, help="the SLO (100 ms, as the published E3 and the CPU runs)")
    p.add_argument("--inputs", type=int, default=512, help="inputs of the replay model, at most the table's")
    p.add_argument("--jobs", help="comma-separated MIX/SYSTEM jobs, e.g. 20:80/e3,20:80/ee-batch (default: all six; "
                                  "a baseline needs an e3 job before it, for the GPU's profile)")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="measure for real, but on the CPU with the tiny model: checks the measuring path (minutes)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    jobs = parse_jobs(a.jobs)
    started = time.monotonic()
    import torch
    device = "cpu" if a.dry_run or a.cpu_rehearsal else a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("goodput_gpu: no CUDA device (use --dry-run or --cpu-rehearsal on a CPU)", file=sys.stderr)
        return 2
    size = Size.tiny() if a.dry_run or a.cpu_rehearsal else Size()
    out = Path(a.out)
    with tempfile.TemporaryDirectory(prefix="e3-gpu-goodput-") as tmp:
        t0 = time.monotonic()
        replay = build(Path(tmp) / "model", size, a.inputs, device=device)
        build_s = time.monotonic() - t0
        print(f"goodput_gpu: built {size} in {build_s:.1f} s; replayed exits match for {replay['match']:.1%}",
              flush=True)
        s = settings(out, device, a.probe_s, a.slo_ms)
        bench = GpuBench(s, Path(tmp), pools_from(Path(tmp) / "model", replay))
        record = Record(out, {"model": "bert-base-replay", "model_size": dataclasses.asdict(size),
                              "device": device, "slo_ms": s.slo_ms, "dry_run": a.dry_run,
                              "cpu_rehearsal": a.cpu_rehearsal,
                              "command": "python3 -m bench.gpu.goodput_gpu " + shlex.join(sys.argv[1:] if argv is None else argv),
                              "environment": environment(), "replay_match": replay["match"],
                              "build_s": round(build_s, 1), "inputs": len(replay["inputs"]),
                              "exit_counts": {str(e): replay["exit_point"].count(e) for e in sorted(set(replay["exit_point"]))},
                              "settings": {"probe_s": s.probe_s, "bisect_steps": s.bisect_steps,
                                           "max_start": s.max_start, "e3_warm_s": s.e3_warm_s}})
        if a.dry_run:
            problems = dry_checks(bench, replay)
            record.data["errors"] += problems
            record.write()
            for line in problems:
                print(f"goodput_gpu: dry run: {line}", file=sys.stderr)
            return 1 if problems else 0
        import uvloop
        uvloop.run(measure(bench, record, started + a.budget_s, jobs))
        record.data["wall_s"] = round(time.monotonic() - started, 1)
        record.write()
        copy_log_tail(bench.logs, out)
    return 1 if record.data["errors"] or not record.data["runs"] else 0


def copy_log_tail(log: Path, out: Path) -> None:
    """The nodes' log tail beside the results (the whole log can be large)."""
    if log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-200:]
        (out / "goodput_gpu_nodes.log").write_text("\n".join(tail) + "\n")


if __name__ == "__main__":
    sys.exit(main())
