"""What a live re-solve costs: the planner's options (the DP's plan, the baselines, the running
plan's value: planner/options.py) timed on the problems a goodput run recorded.

    python3 -m bench.planner_recorded --run bench/results/goodput_cpu-full.json --repeats 3 \\
        --out bench/results/planner_solve_recorded

Each problem is what a node's planner saw (its measured profile, overheads and survival), so
the time is what its planning child spends per re-solve on this machine. One BLAS thread, as
in the planning child.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

from e3.planner.options import options_for
from e3.planner.problem import Problem

from .goodput import environment


def time_options(problem: Problem, repeats: int) -> tuple[list[float], object]:
    times, opts = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        opts = options_for(problem, None)
        times.append(time.perf_counter() - t)
    return times, opts


def rows_of(run: dict, repeats: int) -> list[dict]:
    rows = []
    for r in run["runs"]:
        if "problem" not in r:
            continue
        times, opts = time_options(Problem.from_json(r["problem"]), repeats)
        plan = opts.result.plan
        rows.append({"model": r["model"], "workers": r["workers"], "mix": r["mix"],
                     "seconds": [round(t, 4) for t in times], "median_s": round(statistics.median(times), 4),
                     "plan": None if plan is None else {"splits": plan.splits, "batch": plan.batch,
                                                       "goodput": round(plan.goodput, 1)}})
        print(f"{r['model']:16s} {r['workers']:14s} {r['mix']}: {rows[-1]['median_s']:.3f} s "
              f"[{min(times):.3f}-{max(times):.3f}]", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["# A live re-solve's cost on recorded problems", "",
             f"Command: `{result['command']}`  ",
             f"Date: {result['environment']['date']}; {result['environment']['machine']}; "
             f"Python {result['environment']['python']}, torch {result['environment']['torch']}.  ",
             f"Problems: every run recorded in `{result['run']}`; {result['repeats']} solves each, "
             "one BLAS thread. A solve here is planner/options.py's `options_for`: the DP, the stock and "
             "EE-model baselines, all valued with the queue.", "",
             "| model | workers | mix | seconds (median [min-max]) | plan |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["plan"]
        plan = "none" if p is None else f"{p['splits']} at batch {p['batch']}, {p['goodput']} req/s"
        lines.append(f"| {r['model']} | {r['workers']} | {r['mix']} | {r['median_s']:.3f} "
                     f"[{min(r['seconds']):.3f}-{max(r['seconds']):.3f}] | {plan} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python3 -m bench.planner_recorded", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a goodput run's JSON (bench/results/goodput_*.json)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write <out>.json and <out>.md")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats!r}")
    try:
        run = json.loads(Path(a.run).read_text())
        runs = run["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        p.error(f"--run {a.run!r} is not a goodput run's JSON: {exc}")
    if not any("problem" in r for r in runs):
        p.error(f"--run {a.run!r} records no planner problems")
    with threadpool_limits(limits=1, user_api="blas"):
        rows = rows_of(run, a.repeats)
    result = {"command": " ".join(["python3 -m bench.planner_recorded", *argv]), "environment": environment(),
              "run": a.run, "repeats": a.repeats, "rows": rows}
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
