"""What the cluster path costs on ONE machine: OVERHEAD, not scale.

    python3 -m bench.cluster --out bench/results/cluster_cpu       # ~7 minutes on 2 cores

This machine has 2 cores, so three workers cannot serve more than two cores do, whether they sit in
one node or in three: this benchmark cannot show a cluster scaling out. What it measures is what the
cluster path adds on the way (the coordinator's links, the members' event loops, a boundary that
crosses a link, the rows written into a member's mirror ring and back) with the same three workers
of one thread each, the same fixed plan and the same load:

- `one-node`: one `bin/e3-node --model digits --workers 3 --threads 1 --no-replan --cuts C --batch 8`
  (C: the model's first ramp block, so 2 splits), every split on every worker;
- `cluster`: a coordinator (`--cluster-token-file`, 1 worker of 1 thread) and two members joined
  from 127.0.0.2 and 127.0.0.3 (1 worker of 1 thread each), the same `--no-replan --cuts C --batch 8`
  and no `cluster.split_hosts`: every split on every live worker (0 on the coordinator, 1000 and 1001
  on the members); a batch crosses a link when the dispatcher gives it to a member's worker (how
  often is the dispatcher's choice: the link frame counts per run show it);
- `cluster-split`: the same nodes with `cluster.split_hosts` [["127.0.0.2"], ["127.0.0.3"]]: split 0
  on one member, split 1 on the other, so every batch crosses a link and every survivor crosses two
  (hub and spoke: member to coordinator to member); the coordinator's own worker idles.

For each system (started afresh each repeat; ready when a node serves, and for a cluster when GET
/e3/cluster shows both members "ready" and the placement on their workers, ids >= 1000) an open-loop
Poisson load (bench/loadgen.py, in its own process, all 540 held-out digits) is offered for --warm-s
at the lowest rate, then for --duration-s at each of --rates. Per run: goodput (answers within the
100 ms SLO per second), the share answered (HTTP 200), p50 and p99 latency of the 200s, the node's
mean rows per batch at each split and, for a cluster, the link frames. Systems are interleaved per
repeat (ABC ABC ABC) and each repeat uses the same arrival schedules for all three; figures are
medians with [min-max] over repeats, and the ratios cluster/one-node are taken per repeat (paired,
same schedule, minutes apart), median [min-max].

The load client, the nodes and all workers share the 2 cores: a run whose generator fell behind its
schedule (send lag p99 above --max-lag-ms) is marked client-limited, and one during which other
processes took more than 15% of the machine's CPU is marked noisy (bench/soak.py's CpuShare).
Every process is stopped with SIGTERM (members first), then SIGKILL after --stop-timeout-s, and the
run checks that no process of any node's group is left. Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import secrets
import shlex
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from .goodput import loadgen, write_inputs
from .link_hop import versions
from .nodes import NodeError, batch_rows_of, free_port, mean_rows
from .overload import delta, node_counts
from .planner_solve import machine
from .soak import NOISY_SHARE, CpuShare, _stat
from .workloads import load_pools

ROOT = Path(__file__).resolve().parents[1]
NODE_BIN = ROOT / "bin" / "e3-node"
SYSTEMS = ("one-node", "cluster", "cluster-split")
LABELS = {"one-node": "one node", "cluster": "cluster", "cluster-split": "cluster, split per member"}
COORDINATOR_HOST = "127.0.0.1"
MEMBER_HOSTS = ("127.0.0.2", "127.0.0.3")
SPLIT_HOSTS = [[MEMBER_HOSTS[0]], [MEMBER_HOSTS[1]]]
SHUTDOWN_LOSS = r"member \d+ at [\d.]+ lost: the peer closed the link|worker \d+ on member [\d.]+ lost"
REMOTE_IDS = 1000            # member workers' ids start here (remote_pool.py's id space)


@dataclass
class Settings:
    rates: list[float] = field(default_factory=lambda: [100.0, 300.0, 600.0, 900.0])
    duration_s: float = 8.0
    warm_s: float = 3.0
    repeats: int = 3
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    slo_ms: float = 100.0
    batch: int = 8
    max_lag_ms: float = 20.0
    ready_timeout_s: float = 180.0
    stop_timeout_s: float = 30.0
    out: Path = ROOT / "bench" / "results" / "cluster_cpu"
    argv: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# The systems: command lines and configs (pure)
# --------------------------------------------------------------------------

COMMON = ["--model", "digits", "--threads", "1", "--grpc-port", "0", "--no-demo-query", "--log-level", "WARNING"]


def coordinator_config(system: str, cut: int) -> dict | None:
    """The coordinator's --config file (what no flag sets), or None when flags say it all.

    The file repeats the cut that --cuts gives: e3-node validates a config file on its own, before
    its flags apply, and refuses cluster.split_hosts without batching.cuts in the same file."""
    if system == "cluster-split":
        return {"batching": {"cuts": [cut]}, "cluster": {"split_hosts": SPLIT_HOSTS}}
    return None


def commands(system: str, cut: int, batch: int, port: int, token_file: str | None = None,
             config_file: str | None = None) -> list[tuple[str, list[str]]]:
    """(name, bin/e3-node arguments) of every process of `system`, the front node (the one that
    admits requests, on 127.0.0.1:port) first."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    plan = ["--no-replan", "--cuts", str(cut), "--batch", str(batch)]
    front = ["--host", COORDINATOR_HOST, "--port", str(port)]
    if system == "one-node":
        return [("node", COMMON + ["--workers", "3"] + plan + front)]
    if token_file is None:
        raise ValueError("a cluster needs its token file")
    if (config_file is None) != (coordinator_config(system, cut) is None):
        raise ValueError(f"{system}: the coordinator's config file is {'missing' if config_file is None else 'unexpected'}")
    coordinator = COMMON + ["--workers", "1"] + plan + front + ["--cluster-token-file", token_file]
    if config_file is not None:
        coordinator += ["--config", config_file]
    url = f"http://{COORDINATOR_HOST}:{port}"
    members = [(f"member@{host}", COMMON + ["--workers", "1", "--join", url, "--cluster-token-file", token_file,
                                            "--host", host]) for host in MEMBER_HOSTS]
    return [("coordinator", coordinator)] + members


def shown(argv: list[str]) -> str:
    return "bin/e3-node " + shlex.join(argv)


def one_node_ready(plan: dict, workers: int = 3, splits: int = 2) -> bool:
    """GET /e3/plan of the one node: the fixed plan, every split on all its workers."""
    p = plan.get("placement")
    return bool(p) and len(p["splits"]) == splits and all(len(set(w)) == workers for w in p["workers"])


def cluster_ready(view: dict, system: str, splits: int = 2) -> bool:
    """GET /e3/cluster: both members ready, and the placement on their workers (every live worker on
    every split, or split k on the k-th member's alone)."""
    members = view.get("members") or []
    p = view.get("placement")
    if not p or len(p["splits"]) != splits or len(members) != len(MEMBER_HOSTS):
        return False
    by_host = {m["address"]: m for m in members}
    if set(by_host) != set(MEMBER_HOSTS) or any(m["state"] != "ready" or not m["workers"] for m in members):
        return False
    if any(w < REMOTE_IDS for m in members for w in m["workers"]):
        return False
    if system == "cluster-split":
        return [sorted(w) for w in p["workers"]] == [sorted(by_host[h]["workers"]) for h in MEMBER_HOSTS]
    local = {int(i) for i in view["coordinator"]["workers"]}
    every = local | {w for m in members for w in m["workers"]}
    return all(set(w) == every for w in p["workers"])


# --------------------------------------------------------------------------
# Figures (pure)
# --------------------------------------------------------------------------

def finite(x) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_figures(r: dict, duration_s: float, max_lag_ms: float) -> dict:
    """One loadgen summary as this benchmark reports it (NaN latencies, when nothing was answered, as None)."""
    sent = r["sent"]
    return {"sent": sent, "ok": r["ok"], "good": r["good"], "goodput": round(r["good"] / duration_s, 1),
            "good_fraction": round(r["good"] / sent, 4) if sent else None,
            "answered": round(r["ok"] / sent, 4) if sent else None,
            "p50_ms": finite(r["latency_ms"].get("p50")), "p90_ms": finite(r["latency_ms"].get("p90")),
            "p99_ms": finite(r["latency_ms"].get("p99")), "statuses": r["statuses"],
            "send_lag_ms_p99": finite(r["send_lag_ms_p99"]),
            "client_limited": not (finite(r["send_lag_ms_p99"]) is not None and r["send_lag_ms_p99"] <= max_lag_ms)}


def stat(values: list) -> dict | None:
    """Median and [min-max] of the values that are numbers; None when none is."""
    v = [x for x in values if finite(x) is not None]
    if not v:
        return None
    return {"median": round(statistics.median(v), 4), "min": round(min(v), 4), "max": round(max(v), 4),
            "each": [round(x, 4) if finite(x) is not None else None for x in values]}


def ratio(a, b) -> float | None:
    a, b = finite(a), finite(b)
    return None if a is None or b is None or b == 0 else a / b


def rate_key(rate: float) -> str:
    return f"{rate:g}"


METRICS = ("goodput", "good_fraction", "answered", "p50_ms", "p99_ms")
RATIOS = {"p50": "p50_ms", "p99": "p99_ms", "goodput": "goodput"}


def summarise(runs: list[dict], systems: list[str], rates: list[float], base: str = "one-node") -> dict:
    """Per system and rate: each metric's median [min-max] over repeats; per cluster system and rate:
    cluster/one-node of p50, p99 and goodput, paired by repeat (the same arrival schedule)."""
    by = {(r["system"], r["repeat"], rate_key(r["rate"])): r for r in runs}
    repeats = sorted({r["repeat"] for r in runs})
    table = {sys_: {rate_key(rate): {m: stat([by[(sys_, k, rate_key(rate))][m] for k in repeats
                                               if (sys_, k, rate_key(rate)) in by]) for m in METRICS}
                    for rate in rates} for sys_ in systems}
    ratios = {}
    for sys_ in systems:
        if sys_ == base:
            continue
        ratios[sys_] = {}
        for rate in rates:
            key = rate_key(rate)
            pairs = [(by[(sys_, k, key)], by[(base, k, key)]) for k in repeats
                     if (sys_, k, key) in by and (base, k, key) in by]
            ratios[sys_][key] = {name: stat([ratio(a[m], b[m]) for a, b in pairs]) for name, m in RATIOS.items()}
    return {"systems": table, "ratios": ratios}


def cell(s: dict | None, digits: int = 1, pct: bool = False) -> str:
    """'median [min-max]' of a stat, as a percentage with `pct`."""
    if s is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.{digits}f}%") if pct else (lambda x: f"{x:.{digits}f}")
    return f"{f(s['median'])} [{f(s['min'])}-{f(s['max'])}]"


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

class NodeProc:
    """One `bin/e3-node` process in its own session (so its workers are found and stopped with it),
    its output appended to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.stopped: str | None = None

    async def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "E3_LOG_LEVEL": "WARNING", "TQDM_DISABLE": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(NODE_BIN), *self.argv, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=env, cwd=str(ROOT), start_new_session=True)

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 15) -> str:
        return "\n  ".join(self.log().splitlines()[-n:])

    async def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        end = time.monotonic() + timeout_s
        while True:
            m = re.search(pattern, self.log())
            if m:
                return m
            if self.proc.returncode is not None:
                raise NodeError(f"{self.name} exited {self.proc.returncode} before {pattern!r}; its log ends:\n  "
                                + self.tail())
            if time.monotonic() > end:
                raise NodeError(f"{self.name}: no {pattern!r} within {timeout_s:.0f} s; its log ends:\n  " + self.tail())
            await asyncio.sleep(0.2)

    async def stop(self, timeout_s: float) -> str:
        """SIGTERM (a graceful drain), then SIGKILL to its whole group after `timeout_s`; how it ended."""
        if self.proc is None:
            return "never started"
        if self.proc.returncode is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
                self.stopped = f"SIGTERM: exited {self.proc.returncode} in {time.monotonic() - t0:.1f} s"
            except asyncio.TimeoutError:
                kill_group(self.proc.pid)
                await self.proc.wait()
                self.stopped = f"SIGKILLED after {timeout_s:.0f} s (SIGTERM did not stop it)"
        elif self.stopped is None:
            self.stopped = f"had exited {self.proc.returncode} by itself"
        kill_group(self.proc.pid)            # a worker left behind by its node (there should be none)
        return self.stopped

    def problems(self) -> dict:
        """Lines of its log that say something went wrong."""
        lines = self.log().splitlines()
        return {"tracebacks": sum("Traceback" in ln for ln in lines),
                "errors": [ln for ln in lines if re.search(r"\b(ERROR|CRITICAL)\b|error:", ln)][:10],
                "warnings": [ln for ln in lines if " WARNING " in ln][:10]}


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgids: set[int]) -> list[int]:
    """Live (not zombie) processes in any of these process groups."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat_file.parent.name))
        if fields and fields[0] != "Z" and int(fields[2]) in pgids:
            out.append(int(stat_file.parent.name))
    return out


# --------------------------------------------------------------------------
# One system, one repeat
# --------------------------------------------------------------------------

async def get_json(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as r:
        if r.status != 200:
            raise NodeError(f"GET {url}: HTTP {r.status}")
        return await r.json()


async def get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        return await r.text()


def link_frames(view: dict) -> dict[str, int]:
    """Frames the coordinator sent to each member so far (GET /e3/cluster)."""
    return {m["address"]: m["link"]["frames_sent"] for m in view.get("members", [])}


class Bench:
    def __init__(self, s: Settings, tmp: Path, inputs: Path, model: str, cut: int):
        self.s, self.tmp, self.inputs, self.model, self.cut = s, tmp, inputs, model, cut
        self.token = tmp / "cluster.token"
        self.token.write_text(secrets.token_hex(32) + "\n")
        os.chmod(self.token, 0o600)
        self.pgids: set[int] = set()
        self.stops: list[dict] = []

    def processes(self, system: str, port: int, tag: str) -> list[NodeProc]:
        config = coordinator_config(system, self.cut)
        config_file = None
        if config is not None:
            path = self.tmp / f"{system}.json"
            path.write_text(json.dumps(config))
            config_file = str(path)
        cmds = commands(system, self.cut, self.s.batch, port, str(self.token) if system != "one-node" else None,
                        config_file)
        return [NodeProc(name, argv, self.tmp / f"{tag}-{name}.log") for name, argv in cmds]

    async def ready(self, procs: list[NodeProc], system: str, url: str, http) -> dict:
        front, members = procs[0], procs[1:]
        await front.wait_for(r"serving model '[\w.-]+' on http://", self.s.ready_timeout_s)
        end = time.monotonic() + self.s.ready_timeout_s
        if system == "one-node":
            while not one_node_ready(view := await get_json(http, url + "/e3/plan")):
                if time.monotonic() > end:
                    raise NodeError(f"one node: the plan is not on 3 workers: {view.get('placement')}")
                await asyncio.sleep(0.2)
            return {"placement": view["placement"]}
        for m in members:
            await m.start()
            self.pgids.add(m.pgid)
        while not cluster_ready(view := await get_json(http, url + "/e3/cluster"), system):
            for m in members:
                if m.proc.returncode is not None:
                    raise NodeError(f"{m.name} exited {m.proc.returncode}; its log ends:\n  " + m.tail())
            if time.monotonic() > end:
                raise NodeError(f"{system}: not ready within {self.s.ready_timeout_s:.0f} s: "
                                + json.dumps({k: view.get(k) for k in ("members", "placement")})[:1500])
            await asyncio.sleep(0.2)
        return {"placement": view["placement"], "coordinator_workers": view["coordinator"]["workers"],
                "members": [{k: m[k] for k in ("address", "workers", "devices", "link")} for m in view["members"]]}

    async def one(self, system: str, repeat: int) -> tuple[list[dict], dict]:
        """Start `system`, offer every rate, stop it; the runs and what happened to the processes."""
        s, port = self.s, free_port()
        url = f"http://{COORDINATOR_HOST}:{port}"
        procs = self.processes(system, port, f"r{repeat}-{system}")
        setup = {"system": system, "repeat": repeat, "commands": {p.name: shown(p.argv) for p in procs}}
        runs = []
        t0 = time.monotonic()
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            await procs[0].start()
            self.pgids.add(procs[0].pgid)
            setup |= await self.ready(procs, system, url, http)
            setup["ready_s"] = round(time.monotonic() - t0, 1)
            print(f"  {LABELS[system]} (repeat {repeat + 1}) ready in {setup['ready_s']:.1f} s: workers per split "
                  f"{setup['placement']['workers']}", flush=True)
            await loadgen(url, self.model, self.inputs, min(s.rates), s.warm_s, s.slo_ms, 999)
            for i, rate in enumerate(s.rates):
                cpu = CpuShare()
                metrics0 = await get_text(http, url + "/metrics")
                frames0 = link_frames(await get_json(http, url + "/e3/cluster")) if system != "one-node" else {}
                r = await loadgen(url, self.model, self.inputs, rate, s.duration_s, s.slo_ms, 1000 * repeat + i)
                metrics1 = await get_text(http, url + "/metrics")
                frames1 = link_frames(await get_json(http, url + "/e3/cluster")) if system != "one-node" else {}
                run = {"system": system, "repeat": repeat, "rate": rate, **run_figures(r, s.duration_s, s.max_lag_ms),
                       "foreign_cpu": round(cpu.foreign(), 3),
                       "rows_per_batch": mean_rows(batch_rows_of(metrics0), batch_rows_of(metrics1)),
                       "node": delta(node_counts(metrics0), node_counts(metrics1))}
                if system != "one-node":
                    run["link_frames_sent"] = {h: n - frames0.get(h, 0) for h, n in frames1.items()}
                runs.append(run)
                print(f"    {rate:5g} req/s: goodput {run['goodput']:6.1f}/s ({run['good_fraction']:.1%} within SLO, "
                      f"{run['answered']:.1%} answered), p50 {run['p50_ms'] or float('nan'):.1f} ms, "
                      f"p99 {run['p99_ms'] or float('nan'):.1f} ms, lag p99 {run['send_lag_ms_p99'] or 0:.0f} ms, "
                      f"rows/batch {run['rows_per_batch']}, other CPU {run['foreign_cpu']:.0%}", flush=True)
        except (NodeError, RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # NodeError: a node did not come up; RuntimeError: the load generator failed (goodput.json_from)
            setup["error"] = f"{type(exc).__name__}: {exc}"
            setup["log_tails"] = {p.name: p.tail(40) for p in procs}
            print(f"  {LABELS[system]} (repeat {repeat + 1}): {exc}", file=sys.stderr, flush=True)
        finally:
            await http.close()
            # members first: a member whose coordinator went first would retry its joins for a while
            setup["stopped"] = {}
            for p in reversed(procs):
                setup["stopped"][p.name] = await p.stop(s.stop_timeout_s)
            setup["problems"] = {p.name: p.problems() for p in procs}
            setup["wall_s"] = round(time.monotonic() - t0, 1)
        left = group_members({p.pgid for p in procs if p.pgid})
        setup["left_after_stop"] = left
        return runs, setup


async def run_all(s: Settings) -> dict:
    # SIGINT or SIGTERM cancels the run: the finally clauses below still stop every node (under
    # uvloop.run a plain Ctrl-C is not seen while the run awaits its children)
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    pools = load_pools("digits")
    cut = pools.ramp_blocks[0]
    with tempfile.TemporaryDirectory(prefix="e3-cluster-bench-") as tmp:
        tmp = Path(tmp)
        inputs = write_inputs(pools, list(range(len(pools.inputs))), tmp / "digits.json")
        bench = Bench(s, tmp, inputs, pools.name, cut)
        runs, setups = [], []
        try:
            for repeat in range(s.repeats):
                for system in s.systems:
                    print(f"== repeat {repeat + 1}/{s.repeats}: {LABELS[system]}", flush=True)
                    got, setup = await bench.one(system, repeat)
                    runs += got
                    setups.append(setup)
        finally:
            left = group_members(bench.pgids)
            for pid in left:                     # ours (their groups are ours); there should be none
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return {"model": pools.name, "cut": cut, "inputs": len(pools.inputs), "runs": runs, "setups": setups,
            "left_at_end": left, **summarise(runs, s.systems, s.rates)}


# --------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------

def conditions(result: dict) -> list[str]:
    out = []
    noisy = [r for r in result["runs"] if r["foreign_cpu"] > NOISY_SHARE]
    if noisy:
        out.append(f"NOISY in {len(noisy)} of {len(result['runs'])} runs (other processes took up to "
                   f"{max(r['foreign_cpu'] for r in noisy):.0%} of the machine's CPU)")
    limited = [r for r in result["runs"] if r["client_limited"]]
    if limited:
        out.append(f"CLIENT-LIMITED in {len(limited)} runs (" + ", ".join(
            f"{r['system']} r{r['repeat'] + 1} {r['rate']:g}/s" for r in limited) + ": the generator fell behind)")
    failed = [st for st in result["setups"] if st.get("error")]
    if failed:
        out.append(f"FAILED setups: " + ", ".join(f"{st['system']} r{st['repeat'] + 1}" for st in failed))
    return out


def render_md(result: dict, info: dict, s: Settings, command: str) -> str:
    sysnames = [x for x in s.systems]
    cmds = {}
    for st in result["setups"]:
        cmds.setdefault(st["system"], st["commands"])
    lines = ["# Cluster path OVERHEAD on one machine (not scale)", "",
             f"Command: `{command}`  ", f"Date: {info['date']}; run took {info['wall_s']:.0f} s  ",
             f"Python {info['python']}, torch {info['torch']}, numpy {info['numpy']}, aiohttp {info['aiohttp']}, "
             f"uvloop {info['uvloop']}  ",
             f"Load average (1, 5, 15 min) before: {info['load_before']}; after: {info['load_after']}  ",
             f"Conditions: {'; '.join(conditions(result)) or 'machine otherwise quiet, client kept its schedule'}", "",
             "```", *info["lscpu"], "```", "",
             f"**This is an overhead measurement.** The machine has {os.cpu_count()} cores: three workers of one "
             "thread cannot do more than two cores do, in one node or in three, so nothing here can show a cluster "
             "serving more. All nodes sit on one machine on loopback addresses (127.0.0.1/.2/.3), with the load "
             "client on the same cores; what differs between the systems is the path a batch takes.", "",
             f"Model {result['model']} (digits), fixed plan: `--no-replan --cuts {result['cut']} --batch {s.batch}` "
             f"(2 splits, cut at the first ramp block), 3 workers of 1 thread in every system. Load: open-loop "
             f"Poisson (bench/loadgen.py in its own process) over the {result['inputs']} held-out digits, "
             f"{s.warm_s:g} s warm-up at {min(s.rates):g} req/s, then {s.duration_s:g} s at each rate; SLO "
             f"{s.slo_ms:g} ms; goodput = answers (200) within the SLO per second; latency percentiles are of the 200s. "
             f"Systems interleaved per repeat ({' '.join(sysnames)}) x {s.repeats}, each started afresh and "
             "given the same arrival schedules; median [min-max] over repeats.", "",
             "Systems (PORT, TOKEN and CONFIG stand for this run's free port, token file (0600) and coordinator "
             "config):", ""]
    for system in sysnames:
        if system not in cmds:
            continue
        lines.append(f"- **{LABELS[system]}** (`{system}`):"
                     + (f" CONFIG `{json.dumps(coordinator_config(system, result['cut']))}`"
                        if coordinator_config(system, result["cut"]) else ""))
        for name, c in cmds[system].items():
            c = re.sub(r"--port \d+", "--port PORT", c)
            c = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", c)
            c = re.sub(r"--cluster-token-file \S+", "--cluster-token-file TOKEN", c)
            c = re.sub(r"--config \S+", "--config CONFIG", c)
            lines.append(f"  - {name}: `{c}`")
    lines += ["", "## Per system and rate", "",
              "| offered req/s | system | goodput /s | within SLO | answered (200) | p50 ms | p99 ms |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for rate in s.rates:
        k = rate_key(rate)
        for system in sysnames:
            t = result["systems"][system][k]
            lines.append(f"| {k} | {LABELS[system]} | {cell(t['goodput'])} | {cell(t['good_fraction'], pct=True)} | "
                         f"{cell(t['answered'], pct=True)} | {cell(t['p50_ms'])} | {cell(t['p99_ms'])} |")
    lines += ["", "## Cluster / one node", "",
              "Per repeat (the same arrival schedule, minutes apart), then median [min-max] over repeats. "
              "Latency ratios above 1 and goodput ratios below 1 are what the cluster path costs.", "",
              "| offered req/s | system | p50 ratio | p99 ratio | goodput ratio |", "|---:|---|---:|---:|---:|"]
    for rate in s.rates:
        k = rate_key(rate)
        for system, per_rate in result["ratios"].items():
            r = per_rate[k]
            lines.append(f"| {k} | {LABELS[system]} | {cell(r['p50'], 3)} | {cell(r['p99'], 3)} | "
                         f"{cell(r['goodput'], 3)} |")
    lines += ["", "## Every run", "",
              "rows/batch: the mean rows of the batches entering each split (the front node's /metrics); link "
              "frames sent: the frames the coordinator sent each member during the run (GET /e3/cluster: a batch's "
              "RUN, the CREDIT frames that give credits back when no other frame carries them, heartbeat answers).",
              "",
              "| repeat | system | offered | sent | goodput /s | within SLO | answered | p50 ms | p99 ms | "
              "send lag p99 ms | rows/batch per split | link frames sent | statuses | other CPU |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
    fmt = lambda x, d=1: "n/a" if x is None else f"{x:.{d}f}"
    for r in result["runs"]:
        lines.append(f"| {r['repeat'] + 1} | {LABELS[r['system']]} | {r['rate']:g} | {r['sent']} | {r['goodput']:.1f} | "
                     f"{fmt(r['good_fraction'] and 100 * r['good_fraction'])}% | {fmt(r['answered'] and 100 * r['answered'])}% | "
                     f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['send_lag_ms_p99'], 0)} | "
                     f"{r['rows_per_batch']} | {r.get('link_frames_sent', '-')} | {r['statuses']} | "
                     f"{r['foreign_cpu']:.0%} |")
    lines += ["", "## Setups and shutdown", "",
              "| repeat | system | ready after s | workers per split | link latency ms / MB/s per member | stopped | "
              "left in its groups | log problems |", "|---:|---|---:|---|---|---|---|---|"]
    for st in result["setups"]:
        links = "; ".join(f"{m['address']}: {m['link']['latency_ms']} / {m['link']['bandwidth_mb_s']}"
                          for m in st.get("members", [])) or "-"
        probs = "; ".join(f"{n}: {p['tracebacks']} tracebacks, {len(p['errors'])} error lines"
                          for n, p in st["problems"].items() if p["tracebacks"] or p["errors"]) or "none"
        stopped = "; ".join(f"{n}: {v}" for n, v in st["stopped"].items())
        lines.append(f"| {st['repeat'] + 1} | {LABELS[st['system']]} | {st.get('ready_s', 'FAILED')} | "
                     f"{st.get('placement', {}).get('workers', '-')} | {links} | {stopped} | "
                     f"{st['left_after_stop'] or 'none'} | {probs} |")
    lines += ["", f"Processes of the benchmark's node groups left at the end: {result['left_at_end'] or 'none'}.", ""]
    errors = sorted({e for st in result["setups"] for p in st["problems"].values() for e in p["errors"]})
    if errors:
        lines += ["Error lines in the nodes' logs (first of each kind):", "", "```",
                  *sorted({re.sub(r"^\S+ \S+ ", "", e)[:300] for e in errors})[:20], "```", ""]
        if shutdown_losses_only(result["setups"]):
            lines += ["Only member losses, one per member and one per member worker in each cluster run, and every "
                      "member exited 0 on SIGTERM: the coordinator logs a member that leaves with a goodbye as "
                      "lost, at ERROR (and counts it in `e3_cluster_events_total{event=\"lost\"}`).", ""]
    return "\n".join(lines)


def shutdown_losses_only(setups: list[dict]) -> bool:
    """Whether the nodes' only error lines are each cluster run's members and their workers lost
    once, in runs whose every process exited 0 on SIGTERM (the members' goodbyes at the end)."""
    for st in setups:
        if not all(v.startswith("SIGTERM: exited 0") for v in st["stopped"].values()):
            return False
        errors = [e for p in st["problems"].values() for e in p["errors"]]
        members = [m for m in st.get("members", [])]
        expected = len(members) + sum(len(m["workers"]) for m in members)
        if not all(re.search(SHUTDOWN_LOSS, e) for e in errors) or len(errors) != expected:
            return False
    return True


def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="bench.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="100,300,600,900", help="offered rates, req/s (comma-separated)")
    p.add_argument("--duration-s", type=float, default=8.0, help="seconds of load per rate")
    p.add_argument("--warm-s", type=float, default=3.0, help="warm-up seconds at the lowest rate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--max-lag-ms", type=float, default=20.0)
    p.add_argument("--stop-timeout-s", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=Settings().out, help="writes <out>.json and <out>.md")
    a = p.parse_args(argv)
    try:
        rates = [float(x) for x in a.rates.split(",") if x.strip()]
    except ValueError:
        p.error(f"--rates takes comma-separated numbers, got {a.rates!r}")
    systems = [x.strip() for x in a.systems.split(",") if x.strip()]
    if not rates or min(rates) <= 0:
        p.error("--rates must be positive")
    if a.duration_s <= 0 or a.warm_s <= 0 or a.repeats < 1:
        p.error("--duration-s and --warm-s must be positive and --repeats at least 1")
    if not systems or set(systems) - set(SYSTEMS) or "one-node" not in systems:
        p.error(f"--systems: of {', '.join(SYSTEMS)}, one-node among them (the ratios' base); got {a.systems!r}")
    return Settings(rates=rates, duration_s=a.duration_s, warm_s=a.warm_s, repeats=a.repeats, systems=systems,
                    max_lag_ms=a.max_lag_ms, stop_timeout_s=a.stop_timeout_s, out=a.out, argv=argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s = parse_args(argv)
    command = "python3 -m bench.cluster " + shlex.join(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    import uvloop
    try:
        result = uvloop.run(run_all(s))
    except asyncio.CancelledError:
        print("bench.cluster: interrupted; every node was stopped; nothing written", file=sys.stderr, flush=True)
        return 130
    info = {**machine(), **versions(), "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.monotonic() - t0, 1)}
    s.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(s).items() if k not in ("out", "argv")}
    s.out.with_suffix(".json").write_text(json.dumps({"command": command, "what": "OVERHEAD of the cluster path on one "
                                                      "machine (2 cores cannot show scale)", "machine": info,
                                                      "settings": settings, **result}, indent=1))
    s.out.with_suffix(".md").write_text(render_md(result, info, s, command))
    for system, per_rate in result["ratios"].items():
        print(f"bench.cluster: {LABELS[system]} / one node: " + ", ".join(
            f"{k}/s p50 {cell(r['p50'], 2)}, p99 {cell(r['p99'], 2)}, goodput {cell(r['goodput'], 2)}"
            for k, r in per_rate.items()), flush=True)
    print(f"bench.cluster: wrote {s.out.with_suffix('.md')} and .json ({time.monotonic() - t0:.0f} s); "
          f"processes left: {result['left_at_end'] or 'none'}", flush=True)
    failed = any(st.get("error") for st in result["setups"])
    return 1 if failed or result["left_at_end"] else 0


if __name__ == "__main__":
    sys.exit(main())
