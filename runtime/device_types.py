"""The device types a node's plans may use: its worker groups (planner_host.py), each profiled
once when first seen, minus the types its straggler watch has left out for now.

This node's own group is profiled on one of its workers, cached on disk when the machine was
quiet enough; a member's group is profiled over its link when it joins, never cached (its
machine is not ours to watch, and the same address may be another machine next time).
"""
from __future__ import annotations

import logging
import os
import time

from e3.models.registry import cache_dir
from e3.planner.calibration import machine_cpu_s, others_share, process_cpu_s
from e3.planner.problem import LOCAL
from e3.planner.profiler import cache_key, load_cached, save_cached
from e3.planner.profiles import DeviceProfile
from e3.planner.stragglers import StragglerWatch

from .planner_host import PlannerHost, WorkerGroup

log = logging.getLogger(__name__)


class DeviceTypes:
    """The groups the last problem was made of (`groups`) and every type's profile (`profiles`)."""

    def __init__(self, host: PlannerHost, stragglers: StragglerWatch):
        self.host, self.stragglers = host, stragglers
        self.profiles: dict[str, DeviceProfile] = {}
        self.groups: list[WorkerGroup] = []

    def local_ids(self) -> list[int]:
        """This node's own workers."""
        return [i for g in self.groups if g.host == LOCAL for i in g.worker_ids]

    async def refresh(self) -> str | None:
        """Take the device types as they are now, profiling new ones; why they changed since the
        last problem (a member ready or lost), or None."""
        before = {(g.name, g.worker_ids) for g in self.groups}
        live = self.host.worker_groups()
        for name in self.stragglers.released():
            self.profiles.pop(name, None)          # back from probation: profiled afresh
        for name in set(self.stragglers.excluded) - {g.name for g in live}:
            self.stragglers.forget(name)
        self.groups = await self.profiled([g for g in live if g.name not in self.stragglers.excluded])
        after = {(g.name, g.worker_ids) for g in self.groups}
        if before == after:
            return None
        names = {g.name for g in self.groups}
        for name in [n for n in self.profiles if n not in names]:
            del self.profiles[name]   # a member's next join may be another machine at the same address
        gone, new = sorted(n for n, _ in before - after), sorted(n for n, _ in after - before)
        return "devices changed: " + "; ".join(
            part for part in (f"gone or changed {gone}" if gone else "", f"new or changed {new}" if new else "") if part)

    async def profiled(self, groups: list[WorkerGroup]) -> list[WorkerGroup]:
        """`groups` whose profile is known, profiling those not seen before. This node's own group
        must profile; a member's that fails (lost meanwhile, too slow) is left out until next time."""
        out = []
        for g in groups:
            if g.name not in self.profiles:
                try:
                    self.profiles[g.name] = await self._profile(g)
                except Exception as exc:
                    if g.host == LOCAL:
                        raise
                    log.warning("profiling the workers of %s failed (%s): planning without them", g.name, exc)
                    continue
            out.append(g)
        return out

    async def _profile(self, group: WorkerGroup) -> DeviceProfile:
        rt = self.host
        worker = group.worker_ids[0]
        batches, device = sorted(set(rt.config.replan.batch_sizes)), group.name
        args = {"batch_sizes": batches, "device_name": device}
        if group.host != LOCAL:
            # Taken when the member joins, its workers idle; never cached: its machine is not ours
            # to watch for other work, and the same address may be another machine next time.
            log.info("profiling %s on worker %d", device, worker)
            return DeviceProfile.from_json(await rt.profile(worker, args))
        omp = (rt.worker_env(worker) or os.environ).get("OMP_WAIT_POLICY", "default")
        key = cache_key(rt.model_dir, device, batches, {"policy": rt.policy.name, "omp_wait_policy": omp})
        path = cache_dir() / "profiles" / f"{key}.json"
        cached = load_cached(path)
        if cached is not None:
            return cached
        before = self._cpu_marks(worker)
        profile = DeviceProfile.from_json(await rt.profile(worker, args))
        busy = self._others_share(before, self._cpu_marks(worker))
        if busy is not None and busy > rt.config.replan.profile_busy_share:
            # a profile taken beside other work overstates compute; cached, it would mislead every start
            log.warning("other processes took %.0f%% of the machine while the model was profiled: the profile "
                        "serves this run and is not cached", busy * 100)
        else:
            save_cached(path, profile)
        return profile

    def _cpu_marks(self, worker: int) -> tuple | None:
        """(wall, machine CPU, our CPU: the node's and, for a worker process, its own) seconds."""
        machine, pid = machine_cpu_s(), self.host.worker_pid(worker)
        # real clocks, not the injected ones: this measures the machine, it schedules nothing
        own = time.process_time() + ((process_cpu_s(pid) or 0.0) if pid else 0.0)
        return None if machine is None else (time.monotonic(), machine, own)

    @staticmethod
    def _others_share(before, after) -> float | None:
        if before is None or after is None:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return others_share(after[1] - before[1], after[2] - before[2], after[0] - before[0], cores)

