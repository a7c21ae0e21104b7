"""`bin/e3-plan`: solve a planning problem offline and print the plan.

    e3-plan planner/examples/digits-cpu.json              # human-readable
    e3-plan problem.json --json                           # for machines
    e3-plan problem.json --objective cost --rate 6000     # cheapest plan for a rate
    e3-plan problem.json --devices v100=4,k80=20          # what if the cluster were different?
    e3-plan problem.json --simulate 3                     # replay 3 s of traffic (SIMULATION)

Capacity planning without a node: "how many devices of which type serve
6,000 requests/s at 100 ms?". The schema is in planner/SCHEMA.md. Exit
status: 0 with a plan, 1 when no plan meets the SLO (the output says which
constraint binds), 2 for a bad problem file or argument (one line naming the
field and quoting the value).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from .cost_model import value as valuation
from .baselines import candidates
from .solve import solve
from .errors import PlannerError, ProblemError
from .plan import Plan, SolveResult
from .problem import Problem


class _Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="e3-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("problem", help="JSON problem file (see planner/SCHEMA.md)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--objective", choices=["goodput", "cost"], help="override the problem's objective")
    p.add_argument("--rate", type=float, help="requests/s to serve (objective cost)")
    p.add_argument("--budget", type=float, help="price cap per hour (objective goodput)")
    p.add_argument("--slo-ms", type=float, help="override the SLO")
    p.add_argument("--devices", help="override device counts: name=count[,name=count...]")
    p.add_argument("--simulate", type=float, nargs="?", const=3.0, metavar="SECONDS",
                   help="replay the plan in the simulator for SECONDS of Poisson arrivals at the planned rate "
                        "(exits drawn from the survival) and search its simulated goodput; labelled SIMULATION")
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
        for key, value in (("objective", args.objective), ("rate", args.rate), ("slo_ms", args.slo_ms),
                           ("budget_per_hour", args.budget)):
            if value is not None:
                data[key] = value
        if args.devices:
            _override_counts(data, args.devices)
    return Problem.from_json(data)


def _override_counts(data: dict, spec: str) -> None:
    names = [d.get("name") for d in data.get("devices", []) if isinstance(d, dict)]
    for part in spec.split(","):
        name, _, count = part.partition("=")
        if not count.strip().isdigit():
            raise ProblemError(f"--devices: expected name=count pairs, got {part!r}")
        if name not in names:
            raise ProblemError(f"--devices: no device named {name!r} in the problem (it has {names})")
        data["devices"][names.index(name)]["count"] = int(count)


def describe(problem: Problem, result: SolveResult) -> str:
    what = (f"most goodput from {', '.join(f'{d.count} x {d.name}' for d in problem.devices)}"
            if problem.objective == "goodput" else f"cheapest plan for {problem.rate:g} req/s")
    if problem.objective == "goodput" and problem.budget_per_hour is not None:
        what += f" within {problem.budget_per_hour:g}/h"
    head = (f"{what} at a {problem.slo_s * 1000:g} ms SLO (slack {problem.slack_s * 1000:g} ms, "
            f"utilisation {problem.utilisation:g}); solved in {result.solve_s * 1000:.0f} ms")
    if result.plan is None:
        return f"{head}\nno plan meets the SLO: {result.binding}"
    return f"{head}\n{_table(result.plan, problem)}\n" + "\n".join(_terms(problem, result.plan))


def _terms(problem: Problem, plan: Plan) -> list[str]:
    """Every term of the prediction (the one cost model), and the baselines it beat."""
    lines = valuation(problem, plan).describe()
    for name, base in candidates(problem).items():
        lines.append(f"  baseline {name}: " + (f"{base.goodput:.1f} req/s at batch {base.batch}" if base
                                                 else "no plan meets the SLO"))
    return lines


def _table(plan: Plan, problem: Problem) -> str:
    host = {d.name: d.host for d in problem.devices}
    rows = [("split", "blocks", "device", "host", "replicas", "shared", "ms/batch")]
    for i, st in enumerate(plan.stages()):
        rows.append((str(i), f"{st['first']}-{st['last']}", st["device"], host[st["device"]], str(st["replicas"]),
                     "yes" if st["shared"] else "no", f"{plan.stage_s[i] * 1000:.2f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"batch size {plan.batch}; ramps enabled: {plan.enabled_ramps or 'none (stock model)'}"]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    devices = {}
    for g in plan.groups:
        devices[g.device] = devices.get(g.device, 0) + g.replicas
    lines.append(f"devices used: {', '.join(f'{n} x {d}' for d, n in devices.items())}; "
                 f"cost {plan.cost_per_hour:.2f}/h")
    lines.append(f"predicted goodput {plan.goodput:.1f} req/s; latency {plan.latency_s * 1000:.1f} ms")
    lines.append(f"binding: {plan.binding}")
    return "\n".join(lines)


def simulate(problem: Problem, plan: Plan, seconds: float) -> dict:
    """SIMULATION of the plan: a replay at the planned rate, and a search for its simulated goodput."""
    import numpy as np
    from .simulator import exit_trace, find_goodput, poisson_arrivals
    from .simulator import simulate as replay
    if not 0 < seconds <= 3600:
        raise ProblemError(f"--simulate: expected seconds in (0, 3600], got {seconds!r}")
    rate = problem.rate if problem.objective == "cost" else plan.goodput
    n = int(min(max(rate * seconds, 1000), 1_000_000))
    rng = np.random.default_rng(0)
    at_rate = replay(problem, plan, poisson_arrivals(rate, n, rng), exit_trace(problem.survival, n, rng))
    search = find_goodput(problem, plan, duration_s=seconds, steps=10)
    return {"at_planned_rate": at_rate, "goodput": search}


def _finite(value):
    """`value` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        problem = load_problem(args)
        result = solve(problem)
        sim = simulate(problem, result.plan, args.simulate) if args.simulate and result.plan else None
    except PlannerError as exc:
        print(f"e3-plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = result.to_json()
        if result.plan is not None:
            out["prediction"] = valuation(problem, result.plan).to_json()
            out["baselines"] = {k: v.to_json() if v else None for k, v in candidates(problem).items()}
        if sim:
            out["simulation"] = {k: v.to_json() for k, v in sim.items()}
        # Standard JSON has no Infinity or NaN: a number the solver could not bound is null.
        print(json.dumps(_finite(out), indent=2, allow_nan=False))
    else:
        print(describe(problem, result))
        if sim:
            print(sim["at_planned_rate"].describe())
            print(sim["goodput"].describe().splitlines()[0])
    return 0 if result.plan is not None else 1
