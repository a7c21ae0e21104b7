"""What serving costs beyond the profile, measured live on this node: the cost model's overheads.

The planner actor feeds it each interval's figures; it keeps each overhead blended over intervals
(planner/calibration.py's `blend`) and hands the planner an `Overheads`:

- per batch (dispatch, messages, gathering rows): round trips of batches that found their worker
  idle, less the profile's compute;
- the workers' compute: a scale on the profile's at the rows each split ran plus a fixed part per
  batch, once the splits seen tell the two apart (ComputeFit); until then all of it as the scale;
- the node's own CPU: per request, and per batch of any split once the intervals tell the terms
  apart (NodeCpuFit), with the first-split rows of the busiest interval;
- the share of a core the node's loop gets when it has work (its thread's run time over run time
  plus run-queue wait).

Each is measured only where the config says so (`replan.measure_*`); otherwise it stays as
configured.
"""
from __future__ import annotations

from typing import Sequence

from e3.planner.calibration import (BatchTiming, ComputeFit, NodeCpuFit, blend, core_share, node_seconds_per_request,
                                    per_batch_costs, split_compute_rows, thread_schedstat)
from e3.planner.cost_model import Overheads
from e3.planner.problem import Problem


class OverheadMeter:
    def __init__(self, replan_config):
        self.rc = replan_config
        self.dispatch_s = replan_config.dispatch_ms / 1000         # per batch beyond the profile
        self.node_s = replan_config.node_ms_per_request / 1000     # the node's CPU per request
        self.node_fit = NodeCpuFit()                 # the node's CPU by term, over the last intervals
        self.node_batch_s = 0.0                      # the node's CPU per batch: from the fit
        self.node_entry_rows = 0.0                   # first-split rows at the busiest interval (0: full)
        self.compute_scale = 1.0                     # workers' compute over the profile's
        self.worker_batch_s = 0.0                    # ... plus this per batch (from the fit)
        self.compute_fit = ComputeFit()              # the workers' compute by term, over the last intervals
        self.node_core_share = 1.0                   # of a core, for the node's loop when it has work
        self._sched = None                           # the loop thread's run and wait seconds, read on the loop

    def overheads(self, shares_cores: bool, work_conserving: bool) -> Overheads:
        return Overheads(per_batch_s=self.dispatch_s, node_s_per_request=self.node_s,
                         node_shares_cores=shares_cores, work_conserving=work_conserving,
                         compute_scale=self.compute_scale, node_core_share=self.node_core_share,
                         node_s_per_batch=self.node_batch_s, node_entry_rows=self.node_entry_rows,
                         worker_s_per_batch=self.worker_batch_s)

    def batches(self, problem: Problem, timings: Sequence[BatchTiming]) -> None:
        """Batches that found their worker idle: their round trips less the profile's compute."""
        if self.rc.measure_dispatch and len(timings) >= 8:
            self.dispatch_s = blend(self.dispatch_s, per_batch_costs(problem, timings))

    def compute(self, problem: Problem, splits, busy_s, batches, entered) -> None:
        """One interval of the running plan: its workers' compute seconds, batches and rows per split."""
        if not self.rc.measure_compute:
            return
        rows = split_compute_rows(problem, splits, busy_s, batches, entered)
        self.compute_fit.add(rows)
        fit = self.compute_fit.fit()
        if fit is not None:
            self.compute_scale = min(max(blend(self.compute_scale, [fit.scale]), 0.1), 100.0)
            self.worker_batch_s = blend(self.worker_batch_s, [fit.fixed_s])
            return
        # one ratio until the terms can be told apart, less the fixed part already known
        profiled, n = sum(p for p, _, _ in rows), sum(n for _, n, _ in rows)
        if n >= self.compute_fit.min_batches and profiled > 0:
            sample = (sum(b for _, _, b in rows) - self.worker_batch_s * n) / profiled
            self.compute_scale = min(max(blend(self.compute_scale, [sample]), 0.1), 100.0)

    def node(self, wall_s: float, requests: int, batches: int, cpu_s: float, entry_rows: float | None) -> None:
        """One interval of the node process: its CPU over `wall_s` for these requests and batches."""
        self.node_fit.add(wall_s, requests, batches, cpu_s, entry_rows)
        self._core_share()
        if self.rc.measure_node:
            self._node_cpu(cpu_s, requests)

    def _core_share(self) -> None:
        """Blend the loop thread's run / (run + runnable wait) over the interval into node_core_share."""
        sched, before = thread_schedstat(), self._sched
        self._sched = sched
        if not self.rc.measure_node or sched is None or before is None:
            return
        share = core_share(sched[0] - before[0], sched[1] - before[1])
        if share is not None:
            self.node_core_share = min(1.0, max(0.05, blend(self.node_core_share, [share])))

    def _node_cpu(self, cpu_s: float, requests: int) -> None:
        """The node's CPU by term once the intervals tell the terms apart (per request, per batch of
        any split, and the entry rows of the busiest interval: where the node binds before the
        workers, as on digits, a worker is seldom busy long enough for rows to gather, so batches
        stay small at the node's capacity); until then this interval's ratio, all per request."""
        fit = self.node_fit.fit()
        if fit is None:
            ratio = node_seconds_per_request(cpu_s, requests)
            if ratio is not None:
                self.node_s = blend(self.node_s, [ratio])
            return
        self.node_s = blend(self.node_s, [fit.s_per_request])
        self.node_batch_s = blend(self.node_batch_s, [fit.s_per_batch])
        self.node_entry_rows = self.node_fit.busiest_entry_rows() or 0.0

    def compute_view(self) -> dict | None:
        fit = self.compute_fit.fit()
        return None if fit is None else {"scale": round(fit.scale, 4), "worker_ms_per_batch": round(fit.fixed_s * 1000, 4)}

    def node_cpu_view(self) -> dict | None:
        fit = self.node_fit.fit()
        if fit is None:
            return None
        return {"fixed_cores": round(fit.fixed_cores, 4), "ms_per_request": round(fit.s_per_request * 1000, 4),
                "ms_per_batch": round(fit.s_per_batch * 1000, 4)}
