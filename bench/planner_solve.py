"""Solve times of the planner's DP at cluster scale (no devices needed).

    python3 -m bench.planner_solve [--out bench/results/planner_solve]

Problems: a BERT-like model of 12, 24, 48 and 96 blocks with a ramp after
every block but the last, survival falling geometrically, on (a) 16 devices
of one type, (b) 6 + 8 + 15 devices of three types at different speeds and
prices, (c) 256 devices of one type. Profiles are synthetic (a fixed plus a
per-sample cost per block, scaled per type): solve time depends on the
problem's shape, not on the numbers. Each case is solved for max goodput and
the median of a few runs is printed with the plan found.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from e3.planner.dp import solve
from e3.planner.problem import DeviceType, Problem
from e3.planner.profiles import DeviceProfile

BATCHES = [1, 2, 4, 8, 16, 32]


def profile(name: str, blocks: int, speed: float) -> DeviceProfile:
    cost = lambda fixed, per: [(fixed + per * b) / speed for b in BATCHES]
    return DeviceProfile(name, BATCHES, [cost(1.0e-3, 0.3e-3)] * blocks, [cost(0.1e-3, 0.01e-3)] * (blocks - 1),
                         cost(0.1e-3, 0.01e-3), 0.1e-3, 2e-10)


def problem(blocks: int, devices: list[tuple[str, int, float, float]]) -> Problem:
    survival = [round(0.93 ** (k + 1), 5) for k in range(blocks - 1)]
    types = [DeviceType(n, c, price, profile(n, blocks, speed)) for n, c, speed, price in devices]
    return Problem(blocks, list(range(blocks - 1)), survival, [768 * 128 * 4] * blocks, types, slo_s=0.1,
                   slack_s=0.01, batch_sizes=BATCHES).validate()


CLUSTERS = {
    "16 x 1 type": [("v100", 16, 1.0, 2.5)],
    "6+8+15 x 3 types": [("v100", 6, 1.0, 2.5), ("p100", 8, 0.6, 1.5), ("k80", 15, 0.25, 0.6)],
    "256 x 1 type": [("a100", 256, 1.5, 3.0)],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.planner_solve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="12,24,48,96")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    rows = []
    for blocks in [int(b) for b in args.blocks.split(",")]:
        for cluster, devices in CLUSTERS.items():
            prob = problem(blocks, devices)
            times, result = [], None
            for _ in range(args.repeats):
                t = time.perf_counter()
                result = solve(prob)
                times.append(time.perf_counter() - t)
            plan = result.plan
            row = {"blocks": blocks, "cluster": cluster, "solve_s": statistics.median(times),
                   "exact": result.considered.get("exact"), "goodput": plan.goodput if plan else None,
                   "splits": len(plan.splits) if plan else None, "batch": plan.batch if plan else None}
            rows.append(row)
            print(f"{blocks:3d} blocks, {cluster:17s}: {row['solve_s'] * 1000:9.1f} ms  "
                  f"(goodput {row['goodput'] or 0:10.0f} req/s, {row['splits']} splits, B={row['batch']}, "
                  f"exact search: {row['exact']})", flush=True)
    if args.out:
        machine = {"cpu": _cpu(), "cores": _cores(), "python": platform.python_version(), "numpy": np.__version__,
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": "python3 -m bench.planner_solve "
                                                        f"--out {args.out}", "rows": rows}, indent=1))
        lines = [f"# Planner solve times\n", f"Command: `python3 -m bench.planner_solve --out {args.out}`  ",
                 f"Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, numpy "
                 f"{machine['numpy']}, torch {machine['torch']}; {machine['date']}.\n",
                 "| blocks | devices | solve (ms) | goodput (req/s) | splits | batch | exact search |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['blocks']} | {r['cluster']} | {r['solve_s'] * 1000:.1f} | {r['goodput'] or 0:.0f} | "
                  f"{r['splits']} | {r['batch']} | {r['exact']} |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cores() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
