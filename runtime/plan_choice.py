"""Which plan a node should run: the planner actor's choosing, apart from its measuring and switching.

Every option (the DP's plan, the stock plan, the EE model as is) is valued under the cost model
and, while the plan watch remembers it as failing, by what it measured (planner/plan_watch.py);
the re-plan policy (planner/replan.py) says whether the best one may replace the running plan now.
"""
from __future__ import annotations

import dataclasses
import logging

from e3.planner.baselines import fastest_plan
from e3.planner.options import Options
from e3.planner.plan import Plan
from e3.planner.plan_watch import PlanWatch
from e3.planner.problem import Problem
from e3.planner.replan import ReplanPolicy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Choice:
    """The plan the actor should run under the cost model, and why."""

    plan: Plan | None
    goodput: float            # its value: predicted, times what it measured while remembered
    reason: str
    values: dict              # every option's value ("dp", "stock", "ee-batch")
    fastest: bool = False     # no option met the SLO: the fastest plan, chosen by latency alone

    def to_json(self) -> dict:
        return {"goodput": round(self.goodput, 2), "reason": self.reason,
                "values": {k: None if v is None else round(v, 2) for k, v in self.values.items()}}


class PlanChooser:
    def __init__(self, policy: ReplanPolicy, watch: PlanWatch):
        self.policy, self.watch = policy, watch

    def value(self, plan: Plan) -> float:
        """A plan's goodput as valued under the problem it came with (cost_model.py: 0 if it meets
        no SLO), times what it measured while the watch remembers it."""
        return plan.goodput * self.watch.ratio(plan_key(plan))

    def choose(self, opts: Options) -> Choice:
        """The best of the DP's plan and the baselines, each valued under the cost model and, while a
        plan is remembered as failing, by what it measured. The DP's optimum is never below the
        baselines by the model; the baselines are here for the plans the model got wrong."""
        options = opts.plans
        values = {k: None if p is None else self.value(p) for k, p in options.items()}
        ranked = [(v, k) for k, v in values.items() if v is not None]
        if not ranked:
            return Choice(None, 0.0, "no plan meets the SLO", values)
        # ties go to the stock plan, then the EE model as is: they pay the least per batch
        best_v, best_k = max(ranked, key=lambda vk: (vk[0] * (1 + 1e-9), {"stock": 2, "ee-batch": 1}.get(vk[1], 0)))
        plan = options[best_k]
        others = ", ".join(f"{k} {v:.1f}" for k, v in values.items() if k != best_k and v is not None)
        kind = "stock plan" if len(plan.splits) == 1 else f"splits {plan.splits}"
        return Choice(plan, best_v, f"{kind} ({best_k}): predicted {best_v:.1f} req/s by the cost model "
                                    f"vs {others or 'nothing else'}", values)

    @staticmethod
    def fastest(problem: Problem, why: str) -> Choice:
        """No plan meets the SLO by the model: the stock plan whose own batches take the least time."""
        plan = fastest_plan(problem)
        log.warning("no plan meets the SLO (%s); serving the fastest plan, the stock model at batch %d "
                    "(its batch takes %.1f ms by the cost model)", why, plan.batch, plan.latency_s * 1000)
        return Choice(plan, 0.0, f"no plan meets the SLO: serving the fastest, the stock model at batch {plan.batch} "
                                 f"(its batch takes {plan.latency_s * 1000:.1f} ms)", {}, fastest=True)

    def best_baseline(self, opts: Options, running: Plan | None) -> tuple[str, Plan] | None:
        """The better baseline other than the running plan, by value."""
        options = {k: p for k, p in opts.plans.items()
                   if k != "dp" and p is not None and (running is None or not same_plan(p, running))}
        if not options:
            return None
        return max(options.items(), key=lambda kv: self.value(kv[1]))

    def why_not_switch(self, choice: Choice, running: Plan | None, current: float) -> str | None:
        """None when `choice` should replace the running plan (valued at `current`), else why not
        (kept in the plan view)."""
        if running is not None and same_plan(running, choice.plan):
            return "the running plan is still the best"
        if choice.fastest:           # nothing meets the SLO: the fastest plan, whatever the running one
            return self.policy.why_held()
        if running is not None and len(running.splits) > 1 and len(choice.plan.splits) == 1:
            return self.policy.why_not_fall_back(current, choice.goodput)
        return self.policy.why_not_switch(current, choice.goodput)


def would(choice: Choice, why_not: str | None) -> str:
    """The decision shadow mode records: what the planner would have done with `choice`."""
    if why_not is not None:
        return f"observing: would keep the running plan ({why_not})"
    return f"observing: would run {choice.reason}"


def plan_key(plan: Plan) -> tuple:
    """What the watch remembers a plan by: its splits and where they run, at any batch size. Keyed
    with the batch too, a split plan that fell back after missing the SLO at batch 8 came straight
    back at batch 16 on the next solve and missed again (MiniLM 2 x 1, 80:20, 2026-12-06)."""
    return (tuple(map(tuple, plan.splits)), tuple((g.device, g.replicas, tuple(g.splits)) for g in plan.groups))


def same_plan(a: Plan, b: Plan) -> bool:
    return a.batch == b.batch and a.splits == b.splits and \
        [(g.device, g.replicas, g.splits) for g in a.groups] == [(g.device, g.replicas, g.splits) for g in b.groups]
