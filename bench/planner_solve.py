"""Solve times of the planner's DP at cluster scale (no devices needed).

    python3 -m bench.planner_solve [--out bench/results/planner_solve]

Problems: a BERT-like model cut into 12, 24, 48 or 96 blocks with a ramp
after every block but the last, on (a) 16 devices of one type, (b) 6 + 8 + 15
devices of three types, (c) 256 devices of one type; objective: most goodput
at a 100 ms SLO (10 ms slack, u = 0.8), batch sizes 1..32.

Profiles are synthetic and stated here: per block (0.5 + 0.25 * b) ms * 12 /
blocks on the fastest type (the whole model costs the same however finely it
is cut), ramps and head (0.05 + 0.005 * b) ms, divided by the type's speed
(V100 1, P100 0.66, K80 0.31: the ratios of their published peak FP32
throughput, 14 : 9.3 : 4.37 TFLOPS); transfer 0.1 ms + 0.1 ns per byte of a
[128, 768] float32 state per row. Survival falls linearly from 1 to 0.1 over
the model. Prices: GCP list prices per GPU-hour (2.48, 1.46, 0.45). The solve
time depends on the shape of the problem and on how well the optimum prunes,
so it is a property of these numbers, not of every problem of this size.

Each case: one warm-up solve, then the median of --repeats solves.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from e3.planner.solve import solve
from e3.planner.problem import DeviceType, Problem
from e3.planner.profiles import DeviceProfile

BATCHES = [1, 2, 4, 8, 16, 32]
GOALS = {(24, "6+8+15 x 3 types"): 0.050, (96, "256 x 1 type"): 1.0}

CLUSTERS = {
    "16 x 1 type": [("v100", 16, 1.0, 2.48)],
    "6+8+15 x 3 types": [("v100", 6, 1.0, 2.48), ("p100", 8, 0.66, 1.46), ("k80", 15, 0.31, 0.45)],
    "256 x 1 type": [("v100", 256, 1.0, 2.48)],
}


def profile(name: str, blocks: int, speed: float) -> DeviceProfile:
    scale = 12 / blocks
    cost = lambda fixed, per: [(fixed + per * b) / speed for b in BATCHES]
    return DeviceProfile(name, BATCHES, [cost(0.5e-3 * scale, 0.25e-3 * scale)] * blocks,
                         [cost(0.05e-3, 0.005e-3)] * (blocks - 1), cost(0.05e-3, 0.005e-3), 0.1e-3, 1e-10)


def problem(blocks: int, devices: list[tuple[str, int, float, float]]) -> Problem:
    survival = [round(1 - 0.9 * (k + 1) / blocks, 5) for k in range(blocks - 1)]
    types = [DeviceType(n, c, price, profile(n, blocks, speed)) for n, c, speed, price in devices]
    return Problem(blocks, list(range(blocks - 1)), survival, [128 * 768 * 4] * blocks, types, slo_s=0.1,
                   slack_s=0.01, utilisation=0.8, batch_sizes=BATCHES).validate()


def machine() -> dict:
    import torch
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:10]
    except (OSError, subprocess.SubprocessError):
        lscpu = [platform.processor()]
    return {"lscpu": lscpu, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.planner_solve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="12,24,48,96")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    load_before = round(os.getloadavg()[0], 2)
    rows = []
    for blocks in [int(b) for b in args.blocks.split(",")]:
        for cluster, devices in CLUSTERS.items():
            prob = problem(blocks, devices)
            result = solve(prob)                      # warm-up (imports, caches)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                result = solve(prob)
                times.append(time.perf_counter() - t)
            plan = result.plan
            goal = GOALS.get((blocks, cluster))
            row = {"blocks": blocks, "cluster": cluster, "solve_s": statistics.median(times),
                   "min_s": min(times), "max_s": max(times), "exact": result.considered.get("exact"),
                   "goodput": plan.goodput if plan else None, "splits": len(plan.splits) if plan else None,
                   "batch": plan.batch if plan else None,
                   "pools": [f"{g.replicas} x {g.device}" for g in plan.groups] if plan else None,
                   "goal_s": goal, "goal_met": None if goal is None else statistics.median(times) < goal}
            rows.append(row)
            mark = "" if goal is None else f"  goal < {goal * 1000:.0f} ms: {'met' if row['goal_met'] else 'MISSED'}"
            print(f"{blocks:3d} blocks, {cluster:17s}: {row['solve_s'] * 1000:8.1f} ms  (goodput "
                  f"{row['goodput'] or 0:9.0f} req/s, {row['splits']} splits, B={row['batch']}, "
                  f"{', '.join(row['pools'] or [])}){mark}", flush=True)
    if args.out:
        write(Path(args.out), rows, {**machine(), "load_average_1m_before": load_before}, args)
    return 0


def write(out: Path, rows: list[dict], info: dict, args) -> None:
    command = f"python3 -m bench.planner_solve --blocks {args.blocks} --repeats {args.repeats} --out {out}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "command": command, "rows": rows}, indent=1))
    lines = ["# Planner solve times", "",
             f"Command: `{command}`  ", f"Date: {info['date']}  ",
             f"Python {info['python']}, numpy {info['numpy']}, torch {info['torch']}  ",
             f"1-minute load average before / after: {info['load_average_1m_before']} / "
             f"{info['load_average_1m']} on 2 cores (the VM is shared with other jobs; timings are medians)", "",
             "```", *info["lscpu"], "```", "",
             "Problems as described in `bench/planner_solve.py` (synthetic BERT-like profiles, objective: most "
             "goodput at a 100 ms SLO, batch sizes 1..32). Median of the solves after one warm-up; every "
             "result is the exact optimum of the planner's model (`exact`).", "",
             "| blocks | devices | solve (ms) | min-max (ms) | goodput (req/s) | splits | batch | pools | exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['blocks']} | {r['cluster']} | {r['solve_s'] * 1000:.1f} | {r['min_s'] * 1000:.1f}-"
              f"{r['max_s'] * 1000:.1f} | {r['goodput'] or 0:.0f} | {r['splits']} | {r['batch']} | "
              f"{', '.join(r['pools'] or [])} | {r['exact']} |" for r in rows]
    lines += ["", "Goals:"]
    for r in rows:
        if r["goal_s"] is not None:
            verdict = "met" if r["goal_met"] else "MISSED"
            lines.append(f"- {r['blocks']} blocks on {r['cluster']}: goal < {r['goal_s'] * 1000:.0f} ms, "
                         f"measured {r['solve_s'] * 1000:.1f} ms: **{verdict}**.")
    lines += ["", "For scale: the first DP (commit 611ab8e: dedicated groups, a state of devices used per type, a "
              "scan over the rate) took 233 s for 12 blocks on the three types with the earlier bench profile "
              "on this VM, and its search was not exact (capped candidate list)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
