"""Goodput benchmark: E3 against the EE model served as is, the stock model and the oracle bound.

    bin/e3-bench                 # CPU results, both models, every mix, the switching run (100 min on a 2-core EPYC, 2026-12-02)
    bin/e3-bench --quick         # one model, the 80:20 mix, short probes (a few minutes)

For each model and easy:hard mix, every system (bench/nodes.py) runs as a real
`e3-node` process on the same workers, and an open-loop Poisson load
generator in its own process (bench/loadgen.py) talks to it over HTTP as a
client would. Goodput is the highest offered rate at which at least 99% of
requests get their answer within the SLO, found per system by bracketing and
bisecting the rate. A probe whose generator fell behind its own schedule
(send lag p99 above --max-lag-ms) measures the client, not the node: it
counts as a failure and the result is marked client-limited.

`oracle` is computed, not measured: on n devices, n / sum_k s_k min_b p(k, b) / b
from the node's own profile (p(k, b): block k at batch b; s_k: share of the
mix's requests that run block k), with no ramp, transfer, wait or HTTP cost.
It is a bound, and labelled so.

The sidecar path (bench/sidecar.py): E3 embedded as a library, `rt.infer`
called on the service's own loop, no HTTP. For the systems in
Settings.sidecar (e3; `--sidecar e3,stock` adds stock) on the 80:20 mix, one fresh
process per system runs the same node config, inputs, seeds, probe length
and pass rule, and the same `search`, started at that system's HTTP goodput and
bracketed in x1.2 steps with no bisection: about the run-to-run noise, and
what keeps the sidecar's share of the full run small (see `sidecar_cost`).

Each run writes bench/results/goodput_<device>.json and .md, folds the runs
into bench/results/summary.json, and draws the plots (bench/report.py).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .nodes import SYSTEMS, Node, NodeError, free_port, mean_rows, node_config, pin_to
from .workloads import Pools, load_pools

MIXES = {"80:20": 0.8, "50:50": 0.5, "20:80": 0.2}
ORDER = ("e3", "stock", "ee-batch", "ee-1")       # one repeat: each system's search, in this order
RESULTS = Path(__file__).parent / "results"


@dataclass
class Settings:
    models: list[str]
    mixes: list[str]
    slo_ms: float = 100.0
    workers: int = 1
    threads: int = 2
    # CPU worker configurations measured (workers, threads each): one worker on both cores, and two
    # workers of one thread, where splits can run on separate workers (pipelining, replicas)
    worker_configs: tuple[tuple[int, int], ...] = ((1, 2),)
    repeats: int = 1               # goodput searches per system, interleaved (e3, stock, ee-batch, ee-1, e3, ...)
    probe_s: float = 6.0
    warm_s: float = 3.0            # every node, before its search
    e3_warm_s: float = 14.0        # the planner observes the mix and re-plans
    max_start: float = 400.0       # first probed rate at most (the generator tops out near 1000 req/s here)
    bisect_steps: int = 3            # bracket ratio 1.6 -> within 6%, finer than the run-to-run noise; keeps the run under 30 min
    score_rate: float = 40.0       # accuracy run: the same requests for every system
    score_s: float = 10.0
    max_lag_ms: float = 20.0
    switch: bool = True
    phase_s: float = 30.0
    # Systems also measured on the in-process path. Only e3 by default: with stock too (about 45 s
    # more, measured) the full run would reach its 30-minute limit; `--sidecar e3,stock` adds it.
    sidecar: tuple[str, ...] = ("e3",)
    sidecar_mix: str = "80:20"
    # The sidecar's search brackets its goodput in x1.2 steps from the system's HTTP goodput and stops
    # there: 2 probes when it lies within x1.2 of HTTP. Resolution 20%, about the noise between runs;
    # a bisection step would cost 4 probes (~25 s) that the full run's 30 minutes do not have.
    sidecar_bisect_steps: int = 0
    sidecar_grow: float = 1.2
    sidecar_shrink: float = 1 / 1.2
    # Baseline nodes run the planner in shadow mode and value their own plan with the overheads they
    # measure themselves. A diagnostic of the cost model: the planner's CPU (forecasts, solves) then
    # runs beside each baseline too, so its goodputs are not the ones to take ratios against.
    observe_baselines: bool = False
    out: Path = RESULTS
    device: str = "cpu"
    tag: str = "cpu"               # names the result files; a quick run has its own
    argv: list[str] = field(default_factory=list)

    @classmethod
    def full(cls, **kw) -> "Settings":
        return cls(**{"models": ["minilm", "digits"], "mixes": list(MIXES), "worker_configs": ((1, 2), (2, 1)),
                      "repeats": 2, **kw})

    @classmethod
    def quick(cls, **kw) -> "Settings":
        return cls(**{"models": ["minilm"], "mixes": ["80:20"], "probe_s": 4.0, "warm_s": 2.0, "tag": "cpu-quick",
                      "e3_warm_s": 10.0, "bisect_steps": 3, "score_s": 5.0, "switch": False, "repeats": 3, **kw})


# --------------------------------------------------------------------------
# Bounds and batch sizes from the measured profile
# --------------------------------------------------------------------------

def oracle_goodput(profile, block_survival: list[float], devices: int) -> float:
    """n / sum_k s_k min_b p(k, b) / b: each request pays only its blocks, at the best per-sample cost."""
    per_request = sum(s * min(profile.block(k, b) / b for b in profile.batch_sizes)
                      for k, s in enumerate(block_survival))
    return devices / per_request


def baseline_batch(view: dict, pools: "Pools", picks: list[int], system: str) -> int:
    """A baseline's batch size: the one its plan does best at under the cost model (planner/baselines.py's
    stock and EE-as-is candidates, queue included), valued with what the e3 node measured (its
    profile and overheads, from its view) and this mix's exits; ee-1 runs batch 1."""
    from e3.planner.baselines import best_all_ramps_plan, best_stock_plan, fastest_plan
    if system == "ee-1":
        return 1
    problem = mix_problem(view, pools, picks)
    if problem is None:
        raise RuntimeError("the e3 node's view has no planning problem, which the baselines' batch size needs")
    problem.sample_fraction = 0.0               # baseline nodes sample nothing
    plan = best_stock_plan(problem) if system == "stock" else best_all_ramps_plan(problem)
    return (plan or fastest_plan(problem)).batch


# --------------------------------------------------------------------------
# Load and the goodput search
# --------------------------------------------------------------------------

async def json_from(module: str, *args: str, echo: bool = False, cpus: frozenset[int] | None = None) -> dict:
    """Run `python -m module args` in its own process (on `cpus` if given); its JSON stdout. With
    `echo`, its stderr lines are relayed as they come (the sidecar's probe lines); either way a
    failure quotes them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}   # no weight-loading bars
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).parent.parent), env=env, preexec_fn=pin_to(cpus))
    out = asyncio.create_task(proc.stdout.read())
    tail: list[str] = []
    while line := (await proc.stderr.readline()).decode(errors="replace"):
        tail = (tail + [line])[-30:]
        if echo:
            print(line, end="", flush=True)
    stdout = await out
    if await proc.wait() != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}): {''.join(tail)[-2000:]}")
    return json.loads(stdout)


async def loadgen(url: str, model: str, inputs_path: Path, rate: float, duration_s: float, slo_ms: float,
                  seed: int, cpus: frozenset[int] | None = None) -> dict:
    """One open-loop run of the load generator in its own process (on `cpus` if given); its JSON summary."""
    return await json_from("bench.loadgen", "--url", url, "--model", model, "--inputs", str(inputs_path),
                           "--rate", f"{rate:.3f}", "--duration", str(duration_s), "--slo-ms", str(slo_ms),
                           "--seed", str(seed), cpus=cpus)


def passed(r: dict, max_lag_ms: float) -> bool:
    return r["good_fraction"] >= 0.99 and r["send_lag_ms_p99"] <= max_lag_ms


def _misses(r: dict) -> str:
    """Why requests missed: answered late, or refused/failed by status (503: admission refused)."""
    late = r.get("ok", 0) - r.get("good", 0)
    errors = {k: v for k, v in r.get("statuses", {}).items() if k != "200"}
    return f", missed: {late} late{''.join(f', {n} x {k}' for k, n in sorted(errors.items()))}" \
        if late or errors else ""


def judged(r: dict, rows: dict[str, float], max_lag_ms: float, out=None) -> dict:
    """One probe's load summary with its verdict and rows per split; prints its line.
    The HTTP and the sidecar probes share it, so both apply the same pass rule."""
    r["mean_batch_rows"] = rows
    r["client_limited"] = r["send_lag_ms_p99"] > max_lag_ms
    r["passed"] = passed(r, max_lag_ms)
    r.pop("timeline", None)
    print(f"    {r['rate']:8.1f} req/s: {r['good_fraction']:.2%} within SLO, p99 {r['latency_ms']['p99']:.0f} ms, "
          f"lag p99 {r['send_lag_ms_p99']:.1f} ms, rows/split {r['mean_batch_rows']}{_misses(r)}"
          f"{'  PASS' if r['passed'] else ''}", file=out or sys.stdout, flush=True)
    return r


async def probe(node: Node, inputs_path: Path, rate: float, s: Settings, seed: int) -> dict:
    before = await node.batch_rows()
    r = await loadgen(node.url, node.model_name, inputs_path, rate, s.probe_s, s.slo_ms, seed)
    return judged(r, mean_rows(before, await node.batch_rows()), s.max_lag_ms)


async def search(run_probe, start: float, bisect_steps: int, max_probes: int = 8, grow: float = 1.6,
                 shrink: float = 0.5) -> dict:
    """Bracket (x grow after a pass, x shrink after a failure), then bisect (geometrically) the
    highest rate that passes.

    `run_probe(rate, seed)` is an async callable returning a probe result with
    "rate", "passed", "client_limited" and the load generator's counts."""
    probes, lo, hi, rate, seed = [], None, None, start, 1
    for _ in range(max_probes):
        r = await run_probe(rate, seed)
        probes.append(r)
        seed += 1
        if r["passed"]:
            lo = r
            if hi is not None:
                break
            rate *= grow
        else:
            hi = r
            if lo is not None:
                break
            rate *= shrink
            if rate < 1:
                break
    for _ in range(bisect_steps if lo is not None and hi is not None else 0):
        r = await run_probe(math.sqrt(lo["rate"] * hi["rate"]), seed)
        probes.append(r)
        seed += 1
        lo, hi = (r, hi) if r["passed"] else (lo, r)
    best = lo or {}
    return {"goodput": best.get("rate", 0.0), "at_goodput": best, "probes": probes,
            "client_limited": bool(hi and hi["client_limited"])}


async def sidecar(config: dict, inputs_path: Path, start: float, warm_rate: float, warm_s: float, s: Settings,
                  tmp: Path) -> dict:
    """The goodput search of one system on the sidecar path, in one fresh process (bench/sidecar.py)."""
    path = tmp / "sidecar-node.json"
    path.write_text(json.dumps(config))
    t0 = time.monotonic()
    r = await json_from("bench.sidecar", "--config", str(path), "--inputs", str(inputs_path),
                        "--start", f"{start:.3f}", "--warm-rate", f"{warm_rate:.3f}", "--warm-s", str(warm_s),
                        "--probe-s", str(s.probe_s), "--bisect-steps", str(s.sidecar_bisect_steps),
                        "--grow", str(s.sidecar_grow), "--shrink", str(s.sidecar_shrink), "--slo-ms", str(s.slo_ms),
                        "--max-lag-ms", str(s.max_lag_ms), echo=True)
    return r | {"process_s": round(time.monotonic() - t0, 1), "warm_s": warm_s}


def scores(r: dict) -> dict:
    """Accuracy against the labels and agreement with the full model, of the answered requests."""
    return {"accuracy": r["correct"] / r["labelled"] if r.get("labelled") else None,
            "agreement": r["agree"] / r["ok"] if r.get("ok") else None, "scored": r.get("ok", 0)}


async def search_node(node: Node, inputs_path: Path, start: float, s: Settings) -> dict:
    """The goodput search, then accuracy on the same requests for every system: one light run at
    a fixed rate and seed, so each system answers the very same inputs."""
    result = await search(lambda rate, seed: probe(node, inputs_path, rate, s, seed), start, s.bisect_steps)
    fixed = await loadgen(node.url, node.model_name, inputs_path, s.score_rate, s.score_s, s.slo_ms, 99)
    return result | scores(fixed)


def write_inputs(pools: Pools, picks: list[int], path: Path, phases: list[dict] | None = None) -> Path:
    data = {"inputs": [pools.inputs[i] for i in picks], "labels": [pools.labels[i] for i in picks],
            "reference": [pools.head[i] for i in picks]}
    if phases:
        data |= {"inputs": pools.inputs, "labels": pools.labels, "reference": pools.head, "phases": phases}
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------

class ModelBench:
    """Every system on every mix of one model."""

    def __init__(self, which: str, s: Settings, tmp: Path):
        self.which, self.s, self.tmp = which, s, tmp
        self.pools = load_pools(which)
        self.logs = tmp / f"{which}-nodes.log"

    def config(self, system: str, batch: int | None = None) -> dict:
        return node_config(system, str(self.pools.model_dir), self.pools.ramp_blocks, batch=batch,
                           slo_ms=self.s.slo_ms, workers=self.s.workers, threads=self.s.threads, port=free_port(),
                           observe=self.s.observe_baselines)

    def mix_inputs(self, mix: str) -> tuple[list[int], Path]:
        picks = self.pools.mix(MIXES[mix], 4000, seed=11)
        return picks, write_inputs(self.pools, picks, self.inputs_path(mix))

    def inputs_path(self, mix: str) -> Path:
        return self.tmp / f"{self.which}-{mix.replace(':', '-')}.json"

    async def run(self) -> list[dict]:
        """Every system's goodput search on every mix, `repeats` times, systems interleaved
        (e3, stock, ee-batch, ee-1, e3, stock, ...): a drift of the machine then spreads over all
        systems instead of landing on one, and every goodput comes with its range."""
        runs = []
        for mix in self.s.mixes:
            picks, _ = self.mix_inputs(mix)
            runs.append({"mix": mix, "picks": picks, **{name: [] for name in ORDER}, "views": []})
        profile, batches = None, {}
        for rep in range(self.s.repeats):
            for system in ORDER:
                if system == "e3":
                    for run in runs:
                        print(f"== {self.which} {run['mix']}: e3 (repeat {rep + 1} of {self.s.repeats})", flush=True)
                        result, view = await self.run_e3(self.inputs_path(run["mix"]), run["picks"])
                        run["e3"].append(result)
                        run["views"].append(view)
                    profile = profile or profile_from_view(runs[0]["views"][0])
                    continue
                batches.setdefault(system, self.baseline_batches(system, runs, profile))
                await self.run_baseline(system, batches[system], runs, profile, rep)
        for run in runs:
            run["view"] = run["views"][-1]
            if run["mix"] == self.s.sidecar_mix:
                run["sidecar"] = await self.run_sidecar(run, profile)
        return [self.summarise(run, profile) for run in runs]

    def baseline_batches(self, system: str, runs: list[dict], profile) -> dict[str, int]:
        return {run["mix"]: baseline_batch(run["views"][0], self.pools, run["picks"], system) for run in runs}

    async def run_baseline(self, system: str, batches: dict[str, int], runs: list[dict], profile, rep: int) -> None:
        """One search per mix of a baseline system, one node per batch size."""
        for b in sorted(set(batches.values())):
            async with Node(self.config(system, b), self.logs) as node:
                for run in runs:
                    if batches[run["mix"]] != b:
                        continue
                    print(f"== {self.which} {run['mix']}: {system} (batch {b}, repeat {rep + 1} of "
                          f"{self.s.repeats})", flush=True)
                    path = self.inputs_path(run["mix"])
                    await loadgen(node.url, node.model_name, path, self.start_rate(run, profile) / 2,
                                  self.s.warm_s, self.s.slo_ms, 0)
                    result = await search_node(node, path, self.start_rate(run, profile), self.s)
                    if self.s.observe_baselines:
                        result["observed"] = shadow_view(await node.get_json("/e3/plan"))
                    run[system].append(result | {"batch": b})

    async def run_sidecar(self, run: dict, profile) -> dict:
        """Each sidecar system on this run's mix, in-process: the HTTP run's config (its batch size for
        a baseline), warm-up and inputs; the search starts at the system's HTTP goodput."""
        out = {}
        for system in self.s.sidecar:
            http, start = median_result(run[system]), self.start_rate(run, profile)
            warm_rate, warm_s = (start, self.s.e3_warm_s) if system == "e3" else (start / 2, self.s.warm_s)
            print(f"== {self.which} {run['mix']}: {system}, SIDECAR path (Runtime in-process, no HTTP)", flush=True)
            config = self.config(system, None if system == "e3" else http["batch"])
            out[system] = await sidecar(config, self.inputs_path(run["mix"]), http["goodput"] or start,
                                        warm_rate, warm_s, self.s, self.tmp)
        return out

    def start_rate(self, run: dict, profile) -> float:
        return min(self.s.max_start,
                   0.3 * oracle_goodput(profile, self.pools.block_survival(run["picks"]), self.s.workers))

    async def run_e3(self, path: Path, picks: list[int]) -> tuple[dict, dict]:
        async with Node(self.config("e3"), self.logs) as node:
            view = await node.get_json("/e3/plan")
            start = self.start_rate({"picks": picks}, profile_from_view(view))
            # The planner sees this mix for the first time: let it observe and re-plan first.
            await loadgen(node.url, node.model_name, path, start, self.s.e3_warm_s, self.s.slo_ms, 0)
            result = await search_node(node, path, start, self.s)
            view = await node.get_json("/e3/plan")
            result["plan"] = view["planner"]["plan"]
            result["batch"] = view["placement"]["batch"]
            return result, view

    def summarise(self, run: dict, profile) -> dict:
        surv = self.pools.block_survival(run["picks"])
        oracle = oracle_goodput(profile, surv, self.s.workers)
        systems = {name: _system_summary(median_result(run[name])) | {"repeats": spread(run[name])}
                   for name in ORDER if run.get(name)}
        side = {name: _system_summary(r) | {"http_goodput": systems[name]["goodput"], "fails_at": fails_at(r),
                                            "startup_s": r["startup_s"],
                                            "process_s": r["process_s"], "search_s": r["search_s"],
                                            "warm_s": r["warm_s"]}
                for name, r in run.get("sidecar", {}).items()}
        systems["oracle"] = {"goodput": round(oracle, 1), "bound": True}
        g = {k: v["goodput"] for k, v in systems.items()}
        ranges = {k: v["repeats"] for k, v in systems.items() if "repeats" in v}
        ratio = lambda a, b: round(g[a] / g[b], 3) if g.get(b) else None
        sim = simulated_e3(run["view"], surv, self.pools, run["picks"])
        predicted = self.predicted(run, {k: v.get("batch") for k, v in systems.items()})
        return {"model": self.pools.name, "bench_model": self.which, "device": self.s.device,
                "workers": f"{self.s.workers} x {self.s.threads} threads", "mix": run["mix"],
                "slo_ms": self.s.slo_ms, "block_survival": [round(x, 4) for x in surv],
                "goodput": g, "goodput_range": ranges, "predicted_goodput": predicted,
                "observed_baselines": self.observed(run),
                "accuracy": {k: v.get("accuracy") for k, v in systems.items() if k != "oracle"},
                "agreement": {k: v.get("agreement") for k, v in systems.items() if k != "oracle"},
                "ratios": {"e3/ee-batch": ratio("e3", "ee-batch"), "e3/stock": ratio("e3", "stock"),
                           "e3/ee-1": ratio("e3", "ee-1"), "e3/oracle": ratio("e3", "oracle")},
                "ratio_ranges": {f"e3/{b}": ratio_range(ranges["e3"], ranges[b])
                                 for b in ("ee-batch", "stock") if "e3" in ranges and b in ranges},
                "systems": systems, "sidecar": side, "e3_simulated": sim,
                "planner": _planner_summary(run["view"]["planner"]),
                # the last problem e3's planner solved (profile, overheads): its predictions can be re-derived
                "problem": run["view"]["planner"].get("problem"),
                "transfer": hop_transfer(run["view"])}

    def predicted(self, run: dict, batches: dict) -> dict:
        """The cost model's goodput for each system's plan. e3: what its planner predicted for the
        plan it ran at the end of each search (median over repeats). The baselines: their plan at their
        batch size, valued under the same model with the overheads the e3 node measured and this
        mix's exits (their own nodes do not plan)."""
        e3 = [v["planner"]["prediction"]["goodput"] for v in run["views"]
              if (v["planner"].get("prediction") or {}).get("goodput") is not None]
        out = {"e3": round(statistics.median(e3), 1) if e3 else None}
        problem = mix_problem(run["view"], self.pools, run["picks"])
        if problem is not None:
            for name in ("stock", "ee-batch", "ee-1"):
                if batches.get(name):
                    out[name] = round(baseline_value(problem, name, batches[name]), 1)
        return out

    def observed(self, run: dict) -> dict:
        """With observe_baselines: each baseline's plan as its own node valued it (median over
        repeats), and the overheads and watch of the repeat with the median goodput."""
        out = {}
        for name in ("stock", "ee-batch", "ee-1"):
            seen = [r["observed"] for r in run.get(name, []) if r.get("observed")]
            goodputs = [o["predicted_goodput"] for o in seen if o["predicted_goodput"] is not None]
            if seen:
                out[name] = {"predicted_goodput": round(statistics.median(goodputs), 1) if goodputs else None,
                             **{k: v for k, v in median_result(run[name]).get("observed", {}).items()
                                if k != "predicted_goodput"}}
        return out


def median_result(results: list[dict]) -> dict:
    """The repeat whose goodput is the (lower) median: its probes, latency and accuracy are reported."""
    ordered = sorted(results, key=lambda r: r["goodput"])
    return ordered[(len(ordered) - 1) // 2]


def spread(results: list[dict]) -> dict:
    g = [round(r["goodput"], 1) for r in results]
    return {"median": round(statistics.median(g), 1), "min": min(g), "max": max(g), "each": g}


def ratio_range(a: dict, b: dict) -> dict:
    """a over b: the ratio of medians, and its worst and best ends (a's min over b's max, and back)."""
    div = lambda x, y: round(x / y, 3) if y else None
    return {"median": div(a["median"], b["median"]), "low": div(a["min"], b["max"]), "high": div(a["max"], b["min"])}


def mix_problem(view: dict, pools: Pools, picks: list[int]):
    """The e3 node's last problem (profile, measured overheads) with this mix's real exits."""
    from e3.planner.problem import Problem
    planner = view["planner"]
    if not planner.get("problem"):
        return None
    problem = Problem.from_json(planner["problem"])
    R = len(pools.ramp_blocks)
    exits = [pools.exit_point[i] for i in picks]
    problem.survival = [sum(e > k for e in exits) / len(exits) for k in range(R)]
    return problem.validate()


def baseline_value(problem, system: str, batch: int) -> float:
    """A baseline's plan under the cost model: one split (stock) or a split after every ramp, all on
    the node's workers as one pool, without ramp sampling (its node samples nothing)."""
    from e3.planner.cost_model import value
    from e3.planner.plan import Group, Plan
    L, ramps = problem.num_blocks, list(problem.ramp_blocks)
    ends = [L - 1] if system == "stock" else ramps + [L - 1]
    splits = [[0 if i == 0 else ends[i - 1] + 1, e] for i, e in enumerate(ends)]
    dev = problem.devices[0]
    plan = Plan(batch, splits, [Group(dev.name, dev.count, list(range(len(splits))))],
                [ramps.index(e) for e in ends[:-1]], 0.0, 0.0, 0.0, [0.0] * len(splits))
    problem.sample_fraction = 0.0
    return value(problem, plan).goodput


def shadow_view(view: dict) -> dict:
    """What a baseline's node measured and predicted for its own plan, in shadow mode (GET /e3/plan)."""
    planner = view.get("planner") or {}
    problem = planner.get("problem") or {}
    return {"predicted_goodput": (planner.get("prediction") or {}).get("goodput"),
            "overheads": problem.get("overheads"), "watch": (planner.get("watch") or {}).get("last"),
            "would": (planner.get("last_solve") or {}).get("decision")}


def _planner_summary(planner: dict) -> dict:
    """Solve time, hot swaps, falls back, the overheads it measured, and its last choice."""
    last = planner.get("last_solve") or {}
    return {"solve_s": last.get("solve_s"), "swaps": planner.get("swaps", []),
            "dispatch_ms": None if last.get("dispatch_s") is None else round(last["dispatch_s"] * 1000, 3),
            "overheads": (planner.get("problem") or {}).get("overheads"), "fallbacks": planner.get("fallbacks"),
            "choice": last.get("choice"), "decision": last.get("decision")}


def _system_summary(r: dict) -> dict:
    at = r.get("at_goodput") or {}
    return {"goodput": round(r["goodput"], 1), "batch": r.get("batch"), "accuracy": r.get("accuracy"),
            "agreement": r.get("agreement"), "client_limited": r["client_limited"],
            "latency_ms": at.get("latency_ms"), "mean_batch_rows": at.get("mean_batch_rows"),
            "plan": r.get("plan"), "probes": [{k: p.get(k) for k in ("rate", "good_fraction", "latency_ms",
                                                                    "send_lag_ms_p99", "passed", "mean_batch_rows",
                                                                    "statuses", "ok", "good")}
                                               for p in r["probes"]]}


def fails_at(r: dict) -> float | None:
    """The lowest probed rate above the goodput that failed: the top of the search's bracket."""
    above = [p["rate"] for p in r["probes"] if not p["passed"] and p["rate"] > r["goodput"]]
    return round(min(above), 1) if above else None


def hop_transfer(view: dict) -> dict | None:
    """Per-hop transfer of the e3 plan's boundary states at its batch size, from the profiler's
    measurement on this node (same host: a copy into a shared-memory slot plus a message)."""
    from e3.planner.plan import Plan
    from e3.planner.problem import Problem
    planner = view["planner"]
    if not planner.get("plan") or not planner.get("problem"):
        return None
    problem, plan = Problem.from_json(planner["problem"]), Plan.from_json(planner["plan"])
    prof = problem.devices[0].profile
    hops = {f"after block {last}": round(prof.transfer(problem.boundary_bytes[last] * plan.batch) * 1000, 4)
            for _, last in plan.splits[:-1]}
    return {"batch": plan.batch, "ms_per_hop": hops, "kind": prof.meta.get("transfer", "same-host")}


def profile_from_view(view: dict):
    from e3.planner.problem import Problem
    return Problem.from_json(view["planner"]["problem"]).devices[0].profile


def simulated_e3(view: dict, survival_by_block: list[float], pools: Pools, picks: list[int]) -> dict | None:
    """SIMULATION: the e3 plan in force at the end, replayed with the mix's exits (planner/simulator.py)."""
    from e3.planner.plan import Plan
    from e3.planner.problem import Problem
    from e3.planner.simulator import find_goodput
    planner = view["planner"]
    if not planner.get("plan") or not planner.get("problem"):
        return None
    problem, plan = Problem.from_json(planner["problem"]), Plan.from_json(planner["plan"])
    R = len(pools.ramp_blocks)
    exits = [pools.exit_point[i] for i in picks]
    surv = [sum(e > k for e in exits) / len(exits) for k in range(R)]
    report = find_goodput(problem, plan, survival=surv, duration_s=20.0, steps=10)
    return {"label": "SIMULATION", "goodput": round(report.goodput, 1),
            "latency_ms_at_goodput": report.at_goodput.latency_ms if report.at_goodput else None}


def sidecar_cost(runs: list[dict], s: Settings, full: Settings) -> dict | None:
    """Seconds the sidecar searches took in this run, and an estimate of what they add to a run with
    `full`'s settings, extrapolated per search from the costs measured here: a fixed part (process
    and Runtime start and stop: the slowest seen), the warm-up, and as many probes as that system
    needed here (at least 2 + full.sidecar_bisect_steps: one at the HTTP goodput, one to close the
    bracket, the bisection), each the full probe length plus the overhead per probe seen here.
    Per model, every candidate system is priced, so the cost of adding one can be read off."""
    measured = {name: m for r in runs for name, m in r.get("sidecar", {}).items()}
    if not measured:
        return None
    seen = list(measured.values())
    fixed = max(m["process_s"] - m["warm_s"] - m["search_s"] for m in seen)
    overhead = max(0.0, max(m["search_s"] / len(m["probes"]) - s.probe_s for m in seen))
    least = 2 + full.sidecar_bisect_steps
    probes = {name: max(least, len(measured[name]["probes"]) if name in measured else 0)
              for name in dict.fromkeys(("e3", "stock") + full.sidecar)}
    per = {name: round(fixed + (full.e3_warm_s if name == "e3" else full.warm_s) + n * (full.probe_s + overhead), 1)
           for name, n in probes.items()}
    return {"this_run_s": round(sum(m["process_s"] for r in runs for m in r.get("sidecar", {}).values()), 1),
            "full_run_estimate_s": round(len(full.models) * sum(per[name] for name in full.sidecar)),
            "full_run_systems": list(full.sidecar), "per_model_per_system_s": per, "fixed_s": round(fixed, 1),
            "overhead_per_probe_s": round(overhead, 2), "probes_per_search": probes}


def last_full_run_s(out: Path, tag: str) -> float | None:
    """Wall seconds of the full run recorded in summary.json, less its own sidecar searches."""
    try:
        full = json.loads((out / "summary.json").read_text())[tag]
    except (OSError, ValueError, KeyError):
        return None
    return round(full["wall_s"] - ((full.get("sidecar_cost") or {}).get("this_run_s") or 0.0), 1)


# --------------------------------------------------------------------------
# The switching workload
# --------------------------------------------------------------------------

async def switching(bench: ModelBench, rate: float, s: Settings) -> dict:
    """80:20 -> 50:50 -> 20:80 at one offered rate; the plan the node runs, sampled every half second."""
    phases = [{"start_s": i * s.phase_s, "mix": m, "picks": bench.pools.mix(MIXES[m], 2000, seed=20 + i)}
              for i, m in enumerate(("80:20", "50:50", "20:80"))]
    path = write_inputs(bench.pools, [], bench.tmp / f"{bench.which}-switch.json", phases)
    async with Node(bench.config("e3"), bench.logs) as node:
        samples, t0 = [], time.monotonic()

        async def watch():
            while True:
                v = await node.get_json("/e3/plan")
                last = v["planner"]["last_solve"] or {}
                fc = v["planner"].get("forecast") or {}
                samples.append({"t": round(time.monotonic() - t0, 2), "epoch": v["epoch"],
                                "batch": v["placement"]["batch"], "splits": v["placement"]["splits"],
                                "forecast": [round(x, 3) for x in fc.get("mean", [])],
                                "solve": last.get("reason"), "decision": last.get("decision"),
                                "dispatch_s": last.get("dispatch_s")})
                await asyncio.sleep(0.5)
        watcher = asyncio.create_task(watch())
        try:
            r = await loadgen(node.url, node.model_name, path, rate, 3 * s.phase_s, s.slo_ms, 5)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    return {"model": bench.pools.name, "rate": round(rate, 1), "phase_s": s.phase_s,
            "phases": [p["mix"] for p in phases], "timeline": r["timeline"], "plan_samples": samples,
            "good_fraction": r["good_fraction"], "latency_ms": r["latency_ms"]}


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------

def environment() -> dict:
    import aiohttp
    import numpy
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{cpu}, {os.cpu_count()} cores, no GPU" if not torch.cuda.is_available() else
            f"{cpu}, {os.cpu_count()} cores, {torch.cuda.get_device_name(0)}",
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "aiohttp": aiohttp.__version__}


def say_sidecar_cost(c: dict, wall_s: float, out: Path) -> None:
    """Print what the sidecar took and will take, against the full run's 30-minute budget; the
    last full run's time (from summary.json, before this run rewrites it) goes into `c`."""
    c["last_full_run_without_sidecar_s"] = last_full_run_s(out, Settings.full().tag)
    print(f"e3-bench: the sidecar path took {c['this_run_s']:.0f} s of this run's {wall_s:.0f} s; "
          f"estimated to add {c['full_run_estimate_s']} s ({c['full_run_estimate_s'] / 60:.1f} min) "
          f"to the full run", flush=True)
    if c["last_full_run_without_sidecar_s"]:
        total = c["last_full_run_without_sidecar_s"] + c["full_run_estimate_s"]
        print(f"e3-bench: the last full run without it took {c['last_full_run_without_sidecar_s'] / 60:.1f} min: "
              f"with it, about {total / 60:.1f} min (limit 30)", flush=True)


async def run_all(s: Settings) -> dict:
    from . import report
    started = time.monotonic()
    runs, switch = [], []
    with tempfile.TemporaryDirectory(prefix="e3-goodput-") as tmp:
        for (workers, threads), which in itertools.product(s.worker_configs, s.models):
            print(f"=== {which} on {workers} worker(s) x {threads} thread(s)", flush=True)
            bench = ModelBench(which, dataclasses.replace(s, workers=workers, threads=threads), Path(tmp))
            model_runs = await bench.run()
            runs += model_runs
            if s.switch and (workers, threads) == s.worker_configs[0]:
                rate = 0.7 * min(r["goodput"]["e3"] for r in model_runs)
                print(f"== {which} switching workload at {rate:.0f} req/s", flush=True)
                switch.append(await switching(bench, rate, s))
    result = {**environment(), "command": "bin/e3-bench " + " ".join(shlex.quote(a) for a in s.argv),
              "settings": {"slo_ms": s.slo_ms, "worker_configs": [list(c) for c in s.worker_configs],
                           "repeats": s.repeats, "probe_s": s.probe_s,
                           "bisect_steps": s.bisect_steps, "max_lag_ms": s.max_lag_ms,
                           "sidecar": list(s.sidecar), "sidecar_mix": s.sidecar_mix,
                           "sidecar_bisect_steps": s.sidecar_bisect_steps, "sidecar_grow": s.sidecar_grow,
                           "observe_baselines": s.observe_baselines},
              "wall_s": round(time.monotonic() - started, 1), "runs": runs, "switch": switch,
              "sidecar_cost": sidecar_cost(runs, s, Settings.full())}
    if result["sidecar_cost"]:
        say_sidecar_cost(result["sidecar_cost"], result["wall_s"], s.out)
    report.write(result, s.out, s.tag)
    return result


def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="e3-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MiniLM, 80:20 only, short probes, no switching run")
    p.add_argument("--models", help="comma-separated: minilm, digits (default: both; --quick: minilm)")
    p.add_argument("--mixes", help="comma-separated easy:hard mixes (default 80:20,50:50,20:80)")
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--worker-configs", help="CPU worker configurations, WORKERSxTHREADS comma-separated "
                                           "(default: 1x2,2x1; --quick: 1x2)")
    p.add_argument("--repeats", type=int, help="goodput searches per system, interleaved (default 2; --quick: 3)")
    p.add_argument("--probe-s", type=float, help="seconds of load per probed rate")
    p.add_argument("--no-switch", action="store_true", help="skip the switching workload")
    p.add_argument("--phase-s", type=float, help="seconds per mix of the switching workload (default 30)")
    p.add_argument("--sidecar", help="comma-separated systems also measured on the in-process sidecar path, "
                                     "80:20 mix (default e3; e3,stock adds ~45 s to the full run, bringing it "
                                     "near its 30-minute limit); 'none' skips it")
    p.add_argument("--observe-baselines", action="store_true",
                   help="baseline nodes run the planner in shadow mode and value their own plan with what they "
                        "measure (a diagnostic of the cost model: the planner's CPU then runs beside them too)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    a = p.parse_args(argv)
    kw = {"slo_ms": a.slo_ms, "out": Path(a.out), "argv": argv}
    s = Settings.quick(**kw) if a.quick else Settings.full(**kw)
    if a.models:
        s.models = a.models.split(",")
    if a.mixes:
        s.mixes = a.mixes.split(",")
    if a.probe_s:
        s.probe_s = a.probe_s
    if a.no_switch:
        s.switch = False
    if a.repeats is not None:
        s.repeats = a.repeats
    if a.worker_configs:
        s.worker_configs = _worker_configs(a.worker_configs)
    if a.sidecar:
        s.sidecar = () if a.sidecar == "none" else tuple(a.sidecar.split(","))
    s.observe_baselines = a.observe_baselines
    if a.phase_s:
        s.phase_s, s.switch = a.phase_s, True
    bad = [m for m in s.models if m not in ("minilm", "digits")] + [m for m in s.mixes if m not in MIXES]
    bad += [x for x in s.sidecar if x not in SYSTEMS]
    if bad or not s.models or not s.mixes:
        raise SystemExit(f"e3-bench: error: unknown model, mix or sidecar system {bad}; models: minilm, digits; "
                         f"mixes: {', '.join(MIXES)}; systems: {', '.join(SYSTEMS)}")
    if not (0 < s.slo_ms <= 60000) or s.repeats < 1 or s.probe_s <= 0 or s.phase_s <= 0:
        raise SystemExit("e3-bench: error: need 0 < --slo-ms <= 60000, --repeats >= 1, --probe-s > 0, "
                         "--phase-s > 0")
    return s


def _worker_configs(text: str) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple(tuple(int(x) for x in part.split("x")) for part in text.split(","))
    except ValueError:
        out = ()
    if not out or any(len(c) != 2 or min(c) < 1 for c in out):
        raise SystemExit(f"e3-bench: error: --worker-configs takes WORKERSxTHREADS pairs like 1x2,2x1, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--llm" in argv:            # the generation benchmark (bench/llm_goodput.py)
        from .llm_goodput import main as llm_main
        return llm_main(argv)
    s = parse_args(argv)
    import uvloop
    try:
        uvloop.run(run_all(s))
    except NodeError as exc:
        print(f"e3-bench: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
