"""`bin/e3-plan`: solve a planning problem offline and print the plan.

    e3-plan planner/examples/digits-cpu.json            # human-readable
    e3-plan problem.json --json                         # for machines
    e3-plan problem.json --objective cost --rate 6000   # cheapest plan for a rate

Capacity planning without a node: "how many devices of which type serve
6,000 requests/s at 100 ms?". The schema is in planner/SCHEMA.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from .dp import solve
from .errors import PlannerError
from .problem import Problem


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e3-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("problem", help="JSON problem file (see planner/SCHEMA.md)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--objective", choices=["goodput", "cost"], help="override the problem's objective")
    p.add_argument("--rate", type=float, help="requests/s to serve (objective cost)")
    p.add_argument("--slo-ms", type=float, help="override the SLO")
    return p.parse_args(argv)


def load_problem(args: argparse.Namespace) -> Problem:
    try:
        with open(args.problem) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise PlannerError(f"problem file {args.problem!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise PlannerError(f"problem file {args.problem!r} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        for key, value in (("objective", args.objective), ("rate", args.rate), ("slo_ms", args.slo_ms)):
            if value is not None:
                data[key] = value
    return Problem.from_json(data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        problem = load_problem(args)
        result = solve(problem)
    except PlannerError as exc:
        print(f"e3-plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif result.plan is None:
        print(f"no plan meets the SLO: {result.binding}")
    else:
        what = (f"most goodput from {', '.join(f'{d.count} x {d.name}' for d in problem.devices)}"
                if problem.objective == "goodput" else f"cheapest plan for {problem.rate:g} req/s")
        print(f"{what} at a {problem.slo_s * 1000:g} ms SLO (solved in {result.solve_s * 1000:.0f} ms):")
        print(result.plan.describe())
    return 0 if result.plan is not None else 1
