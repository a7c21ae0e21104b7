"""The planner actor: exit counts -> forecast -> DP -> a better plan -> hot swap.

It runs on the node's event loop but never computes there: profiling runs on
a worker (PROFILE message), forecasting and solving in a thread. Every
`replan.interval_s` it reads the exit counts of the running epochs, turns
them into a survival estimate, feeds the forecaster, and, when the policy
says so, re-solves and applies the new plan if its predicted goodput beats
the current plan's (re-valued under the same forecast) by `min_gain`. The
loop logs and survives its own errors.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from e3.models.registry import cache_dir, read_manifest
from e3.planner.dispatch import BatchTiming, Choice, blend, choose_plan, dispatch_goodput, per_batch_costs
from e3.planner.dp import evaluate, solve
from e3.planner.forecast import Forecast, Forecaster, estimate_survival
from e3.planner.plan import Plan
from e3.planner.problem import DeviceType, Problem
from e3.planner.profiler import cache_key, load_cached, save_cached
from e3.planner.profiles import DeviceProfile
from e3.planner.replan import ReplanPolicy

from .forecast_process import ForecastProcess
from .pipeline import Placement
from .slots import boundary_slots
from .wire import Kind

log = logging.getLogger(__name__)


def prior_survival(model_dir, num_ramps: int) -> list[float]:
    """Survival per ramp recorded when the model was trained (all ramps on), else none exit."""
    trained = read_manifest(model_dir).get("trained") or {}
    figures = trained.get("test") or trained.get("validation") or {}
    fractions = figures.get("exit_fraction")
    if not fractions:
        return [1.0] * num_ramps
    out, left = [], 0.0
    for f in fractions[:num_ramps]:
        left += f
        out.append(max(0.0, 1.0 - left))
    return out


def placement_from_plan(plan: Plan, worker_ids: list[int], ring_slots: tuple[int, ...] = ()) -> Placement:
    """Give each group of the plan its own workers, in order."""
    workers: list[tuple[int, ...]] = [()] * len(plan.splits)
    free = list(worker_ids)
    for g in plan.groups:
        mine, free = tuple(free[:g.replicas]), free[g.replicas:]
        for i in g.splits:
            workers[i] = mine
    return Placement(plan.batch, tuple(tuple(s) for s in plan.splits), tuple(workers), tuple(plan.stage_s),
                     ring_slots)


class PlannerActor:
    def __init__(self, runtime, clock: Callable[[], float] = time.monotonic):
        self.rt, self.clock = runtime, clock
        rc = runtime.config.replan
        meta = runtime.meta
        # hold: a plan runs at least one re-solve period, so a value hovering at a threshold cannot flap
        self.policy = ReplanPolicy(rc.interval_s * 5, rc.min_gain, hold_s=rc.interval_s * 5, clock=clock)
        self.forecaster = Forecaster(meta.num_ramps, prior=prior_survival(runtime.model_dir, meta.num_ramps))
        self.profile: DeviceProfile | None = None
        self.plan: Plan | None = None
        self.last_forecast = None
        self.last_solve: dict = {}
        self.last_problem: Problem | None = None   # what the last solve saw, for replay in the simulator
        self.dispatch_s = rc.dispatch_ms / 1000     # per-batch cost beyond the profile: measured, blended
        self.swaps: list[dict] = []                 # the last hot swaps: epoch, reason, seconds to apply
        self._task: asyncio.Task | None = None
        self._fits: ForecastProcess | None = None   # the forecast process (replan.forecast_process)

    # -- lifecycle ---------------------------------------------------------

    async def initial_placement(self) -> Placement:
        self.profile = await self._profile()
        survival = self.forecaster.forecast().mean
        problem = self._problem(survival)
        result = await asyncio.get_running_loop().run_in_executor(None, solve, problem)
        choice = self._choose(problem, result)
        self._record(result, problem, "start", choice, "applied" if choice.plan else "none")
        if choice.plan is None:
            log.warning("no plan meets the SLO (%s); serving the configured placement", result.binding)
            return self.rt.static_placement()
        self.plan = choice.plan
        self.policy.planned(survival, switched=False)
        return self._placement(choice.plan, problem)

    async def start(self) -> None:
        if self.rt.config.replan.forecast_process:
            self._fits = ForecastProcess()
            await self._fits.start()
        self._task = asyncio.create_task(self._loop(), name="e3-planner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._fits is not None:
            fits, self._fits = self._fits, None
            await fits.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.rt.config.replan.interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("planner tick failed; trying again next interval")

    # -- one interval ------------------------------------------------------

    async def tick(self) -> bool:
        """Observe, forecast, maybe re-solve and switch. Returns whether a plan was applied."""
        self._observe()
        loop = asyncio.get_running_loop()
        fc = await self._forecast()
        self.last_forecast = fc
        self.rt.metrics.forecast(fc.mean)
        reason = self.policy.reason_to_solve(fc.mean)
        if reason is None or self.profile is None:
            return False
        problem = self._problem(fc.mean)
        result = await loop.run_in_executor(None, solve, problem)
        self.policy.solved()
        choice = self._choose(problem, result)
        why_not = self._why_not_switch(problem, choice)
        self._record(result, problem, reason, choice, why_not or "applied")
        if why_not is not None:
            return False
        placement = self._placement(choice.plan, problem)
        started = self.clock()
        epoch = await self.rt.apply(placement)
        self.swaps.append({"epoch": epoch, "reason": reason, "swap_s": self.clock() - started})
        del self.swaps[:-20]
        choice.plan.epoch = epoch
        self.plan = choice.plan
        self.policy.planned(fc.mean)
        log.info("applied plan epoch %d (%s; %s): %s", epoch, reason, choice.reason,
                 choice.plan.describe().splitlines()[0])
        return True

    async def _forecast(self) -> Forecast:
        """The forecast, fitted in the forecast process when there is one.

        statsmodels' ARIMA holds the GIL (scipy's optimiser calls back into Python): 60-86 ms for 5
        ramps here. On a thread of the node that stalled the event loop every interval, and the
        requests caught in it missed the SLO (an e3 node running the stock plan served 87 req/s of
        MiniLM 20:80 where a stock node served 140)."""
        if self._fits is None:
            return await asyncio.get_running_loop().run_in_executor(None, self.forecaster.forecast)
        return await self._fits.forecast(self.forecaster)   # restarts the process if it died

    def _placement(self, plan: Plan, problem: Problem) -> Placement:
        """The plan on this node's workers, its rings sized for the survival it was planned for."""
        placement = placement_from_plan(plan, sorted(self.rt.workers))
        c = self.rt.config
        slots = boundary_slots(plan.batch, [problem.survival_before(first) for first, _ in plan.splits],
                               [len(w) for w in placement.workers], c.workers.max_inflight,
                               c.batching.slots_per_ring)
        return dataclasses.replace(placement, ring_slots=slots)

    def _choose(self, problem: Problem, result) -> Choice:
        """The DP's plan or the stock plan, valued as the runtime dispatches (planner/dispatch.py)."""
        if not self.rt.config.replan.stock_guard:
            return Choice(result.plan, result.plan.goodput if result.plan else 0.0, None, "the DP's plan (no guard)")
        return choose_plan(problem, result.plan, self.dispatch_s, self.rt.config.replan.min_gain)

    def _value(self, problem: Problem, plan: Plan) -> float:
        """Predicted goodput of a plan by the model that chose it."""
        if not self.rt.config.replan.stock_guard:
            return evaluate(problem, plan)[0]
        return dispatch_goodput(problem, plan, self.dispatch_s)[0]

    def _why_not_switch(self, problem: Problem, choice: Choice) -> str | None:
        """None when `choice` should replace the running plan, else why not (kept in the plan view)."""
        if choice.plan is None:
            return "no plan meets the SLO"
        if self.plan is not None and _same_plan(self.plan, choice.plan):
            return "the running plan is still the best"
        current = self._value(problem, self.plan) if self.plan is not None else 0.0
        if self.plan is not None and len(self.plan.splits) > 1 and choice.falls_back:
            return self.policy.why_not_fall_back(current, choice.goodput)
        return self.policy.why_not_switch(current, choice.goodput)

    def _observe(self) -> None:
        timings = []
        for p in list(self.rt.pipelines.values()):
            st = p.take_stats()
            # the latest few hundred are plenty for a median, and this runs on the node's loop
            timings += [BatchTiming(*p.placement.splits[i], rows, rtt) for i, rows, rtt in st.idle_timings[-256:]]
            admitted = st.entered[0]
            s = estimate_survival(p.placement.splits, self.rt.meta.ramp_blocks, admitted, st.exits,
                                  st.observed, st.observed_entered)
            if s is not None and admitted >= 8:
                self.forecaster.observe(s)
        if self.rt.config.replan.measure_dispatch and self.last_problem is not None and len(timings) >= 8:
            self.dispatch_s = blend(self.dispatch_s, per_batch_costs(self.last_problem, timings))

    # -- helpers -----------------------------------------------------------

    def _problem(self, survival) -> Problem:
        rt, c = self.rt, self.rt.config
        meta = rt.meta
        return Problem(meta.num_blocks, list(meta.ramp_blocks), list(survival),
                       [meta.boundary_bytes(b) + sum(f.bytes_per_sample for f in rt.policy.state_fields())
                        for b in range(meta.num_blocks)],
                       [DeviceType(self.profile.device, len(rt.workers), 0.0, self.profile)],
                       slo_s=c.batching.slo_ms / 1000, slack_s=c.batching.slo_ms / 1000 * c.batching.slo_reserve,
                       utilisation=c.replan.utilisation,
                       batch_sizes=[b for b in c.replan.batch_sizes if b <= 4096] if c.batching.batch is None
                       else [c.batching.batch]).validate()

    async def _profile(self) -> DeviceProfile:
        rt = self.rt
        worker = rt.workers[min(rt.workers)]
        batches = sorted(set(rt.config.replan.batch_sizes))
        device = f"{worker.device}-{rt.config.workers.threads_per_worker}t"
        path = cache_dir() / "profiles" / f"{cache_key(rt.model_dir, device, batches, {'policy': rt.policy.name})}.json"
        cached = load_cached(path)
        if cached is not None:
            return cached
        reply = await rt.request(worker, Kind.PROFILE, args={"batch_sizes": batches, "device_name": device})
        profile = DeviceProfile.from_json(reply["profile"])
        save_cached(path, profile)
        return profile

    def _record(self, result, problem: Problem, reason, choice: Choice, decision: str) -> None:
        self.last_problem = problem
        self.last_solve = {"reason": reason, "survival": list(problem.survival), **result.to_json(),
                           "dispatch_s": self.dispatch_s, "choice": choice.to_json(), "decision": decision}

    def view(self) -> dict:
        return {"plan": self.plan.to_json() if self.plan else None,
                "forecast": self.last_forecast.to_json() if self.last_forecast else None,
                "last_solve": self.last_solve,
                "problem": self.last_problem.to_json() if self.last_problem else None,
                "swaps": list(self.swaps),
                "profile": {"device": self.profile.device, "batch_sizes": self.profile.batch_sizes,
                            "meta": self.profile.meta} if self.profile else None}


def _same_plan(a: Plan, b: Plan) -> bool:
    return a.batch == b.batch and a.splits == b.splits and \
        [(g.device, g.replicas, g.splits) for g in a.groups] == [(g.device, g.replicas, g.splits) for g in b.groups]


def planner_factory(runtime) -> PlannerActor:
    return PlannerActor(runtime)
