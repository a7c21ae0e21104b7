"""What one re-solve yields under one problem: the DP's plan, the baselines, the running plan's value.

The planner actor decides from these (runtime/planner_actor.py). Computing them takes the DP
and the queue's chain solves, 0.15-0.9 s of mostly Python on a 2-core CPU, which on a thread of
the node holds the GIL beside its event loop: the node then computes them in its planning
child process (planner/forecast_server.py), and they cross as JSON.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cost_model import goodput_within_slo
from .baselines import candidates
from .solve import solve
from .plan import Plan, SolveResult
from .problem import Problem


@dataclass
class Options:
    result: SolveResult | None        # the DP's (None when only the baselines were asked for)
    plans: dict[str, Plan | None]     # "dp" (with a result), "stock", "ee-batch"; each valued under the problem
    running: float | None             # the running plan's goodput under the problem (None: none runs)

    def to_json(self) -> dict:
        return {"result": None if self.result is None else self.result.to_json(),
                "plans": {k: None if p is None else p.to_json() for k, p in self.plans.items()},
                "running": self.running}

    @staticmethod
    def from_json(d: dict) -> "Options":
        r = d["result"]
        result = None if r is None else SolveResult(None if r["plan"] is None else Plan.from_json(r["plan"]),
                                                    r["binding"], r["solve_s"], r["considered"])
        return Options(result, {k: None if p is None else Plan.from_json(p) for k, p in d["plans"].items()},
                       d["running"])


def options_for(problem: Problem, running: Plan | None, with_solve: bool = True) -> Options:
    """The DP's plan (if `with_solve`), the baselines and the running plan's value, under `problem`."""
    result = solve(problem) if with_solve else None
    plans = ({"dp": result.plan} if result is not None else {}) | candidates(problem)
    if running is None:
        return Options(result, plans, None)
    # a plan on devices that are gone (a lost member's) serves nothing
    return Options(result, plans, goodput_within_slo(problem, running) if problem.fits(running) else 0.0)
