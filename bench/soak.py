"""Soak: a real e3-node under a fixed Poisson rate for minutes, node and worker RSS over time.

    python3 -m bench.soak                     # 10 minutes at 450 req/s on the digits model
    python3 -m bench.soak --minutes 1 --rate 200

The load generator (bench/loadgen.py) runs in its own process, one window
(--window-s) after another so that answers are counted as they come; between
windows the node's and each worker's resident memory is read from /proc.
Growth is reported in % from the first window's end (after warm-up: the
allocator's and torch's first-touch growth is not a leak) to the last.
Writes bench/results/soak.{json,md}.

Also the /proc readers the overload benchmark uses (RSS of a process tree and
how much of the machine's CPU other processes took: a run measured while the
machine was shared is marked noisy).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
NOISY_SHARE = 0.15          # other processes above this share of the machine's CPU: the run is noisy


# --------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/pid/stat after "(comm)", or None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields and fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def rss_mb(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError):
        return None


def tree_rss(node_pid: int) -> dict:
    """RSS (MB) of the node and of each of its worker processes (children, not the forecast child)."""
    workers = {}
    for pid in children(node_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"worker_process" in cmd:
            workers[str(pid)] = rss_mb(pid)
    return {"node": rss_mb(node_pid), "workers": workers}


def _cpu_s(pid: int, waited: bool) -> float:
    f = _stat(pid)
    if not f:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if waited else 0)
    return ticks / TICK


class CpuShare:
    """How much of the machine's CPU went to processes outside this one's tree over an interval.

    Ours: this process and its live descendants, plus the waited-for ones (cutime)."""

    def __init__(self):
        self._t0 = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        busy = 0.0
        with open("/proc/stat") as fh:
            cpu = [int(x) for x in fh.readline().split()[1:]]
        busy = (sum(cpu) - cpu[3] - cpu[4]) / TICK          # all but idle and iowait
        me = os.getpid()
        ours = _cpu_s(me, True) + sum(_cpu_s(p, True) for p in descendants(me))
        return time.monotonic(), busy, ours

    def foreign(self) -> float:
        """Share of all cores used by other processes since the last call (0..1)."""
        t1 = self._read()
        (w0, b0, o0), (w1, b1, o1) = self._t0, t1
        self._t0 = t1
        if w1 <= w0:
            return 0.0
        # Clamped: over a short interval the counters' 10 ms ticks can overshoot the wall time.
        return min(1.0, max(0.0, (b1 - b0) - (o1 - o0)) / ((w1 - w0) * (os.cpu_count() or 1)))


def growth_pct(first: float | None, last: float | None) -> float | None:
    return None if not first or last is None else round(100 * (last - first) / first, 2)


# --------------------------------------------------------------------------
# The soak
# --------------------------------------------------------------------------

async def soak(model: str, rate: float, minutes: float, window_s: float, tmp: Path, slo_ms: float = 100.0) -> dict:
    from .goodput import loadgen, write_inputs
    from .nodes import Node, free_port
    from .workloads import load_pools
    pools = load_pools(model)
    path = write_inputs(pools, list(range(len(pools.inputs))), tmp / f"{model}.json")
    windows, cpu = [], CpuShare()
    async with Node({"model": {"path": str(pools.model_dir)}, "server": {"port": free_port()}},
                    tmp / "node.log") as node:
        t0, end = time.monotonic(), time.monotonic() + minutes * 60
        while time.monotonic() < end or len(windows) < 2:     # growth needs two readings
            r = await loadgen(node.url, node.model_name, path, rate, min(window_s, max(1.0, end - time.monotonic())),
                              slo_ms, len(windows))
            rss = tree_rss(node.proc.pid)
            windows.append({"t_s": round(time.monotonic() - t0, 1), "sent": r["sent"], "good": r["good"],
                            "statuses": r["statuses"], "p99_ms": r["latency_ms"]["p99"],
                            "send_lag_ms_p99": r["send_lag_ms_p99"], "foreign_cpu": round(cpu.foreign(), 3),
                            **rss})
            print(f"  {windows[-1]['t_s']:6.1f} s: {r['good']}/{r['sent']} within SLO, node {rss['node']:.0f} MB, "
                  f"workers {[round(v) for v in rss['workers'].values()]} MB", flush=True)
    return summarise(windows, model, rate, minutes, slo_ms)


def summarise(windows: list[dict], model: str, rate: float, minutes: float, slo_ms: float) -> dict:
    first, last = windows[0], windows[-1]
    sent, good = sum(w["sent"] for w in windows), sum(w["good"] for w in windows)
    worker_growth = {pid: growth_pct(first["workers"].get(pid), mb) for pid, mb in last["workers"].items()}
    foreign = max(w["foreign_cpu"] for w in windows)
    return {"model": model, "rate": rate, "minutes": minutes, "slo_ms": slo_ms, "sent": sent, "good": good,
            "good_fraction": good / sent if sent else 0.0,
            "node_rss_growth_pct": growth_pct(first["node"], last["node"]),
            "worker_rss_growth_pct": worker_growth,
            "client_limited": any(w["send_lag_ms_p99"] > 20 for w in windows),
            "noisy": foreign > NOISY_SHARE, "foreign_cpu_max": foreign, "windows": windows}


def render_md(r: dict, env: dict, command: str) -> str:
    lines = [f"# Soak: {r['model']} at {r['rate']:g} req/s for {r['minutes']:g} min", "",
             f"Command: `{command}`  ", f"Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}, "
             f"aiohttp {env['aiohttp']}; {env['date']}  ",
             f"Conditions: {'NOISY: other processes took up to ' + format(r['foreign_cpu_max'], '.0%') + ' of the machine' if r['noisy'] else 'machine otherwise quiet'}"
             f"{'; the load client fell behind its schedule (client-limited)' if r['client_limited'] else ''}", "",
             f"{r['sent']} requests, {r['good_fraction']:.3%} within the {r['slo_ms']:g} ms SLO. "
             f"RSS growth from the end of the first window to the last: node {r['node_rss_growth_pct']}%, "
             f"workers {', '.join(f'{v}%' for v in r['worker_rss_growth_pct'].values())}.", "",
             "| t (s) | sent | within SLO | p99 ms | node MB | workers MB | other CPU |",
             "|---:|---:|---:|---:|---:|---|---:|"]
    for w in r["windows"]:
        lines.append(f"| {w['t_s']} | {w['sent']} | {w['good']} | {w['p99_ms']:.0f} | {w['node']:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in w['workers'].values())} | {w['foreign_cpu']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import shlex
    import tempfile
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", choices=["digits", "minilm"])
    p.add_argument("--rate", type=float, default=450.0)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.minutes <= 0 or args.window_s <= 0:
        print("bench.soak: error: --rate, --minutes and --window-s must be positive", file=sys.stderr)
        return 2
    from .goodput import environment
    with tempfile.TemporaryDirectory(prefix="e3-soak-") as tmp:
        import uvloop
        r = uvloop.run(soak(args.model, args.rate, args.minutes, args.window_s, Path(tmp)))
    env = environment()
    command = "python3 -m bench.soak " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({"command": command, "environment": env, **r}, indent=1))
    (args.out / "soak.md").write_text(render_md(r, env, command))
    print(f"bench.soak: node RSS {r['node_rss_growth_pct']}%, workers {r['worker_rss_growth_pct']}; "
          f"wrote {args.out / 'soak.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
