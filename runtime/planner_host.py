"""What the planner actor sees of the node: `PlannerHost`.

The actor reads the config, the model's metadata, the metrics, each running
epoch's counts and timings, and the workers grouped into device types
(`WorkerGroup`: this node's own, and on a coordinator each member's, behind
the link measured to it); it calls for a profile on one worker of a group
and for a placement to be applied. Nothing else of the Runtime reaches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from e3.models.base import ModelMeta
from e3.models.policies import ExitPolicy
from e3.planner.problem import LOCAL, Link

from .config import E3Config
from .metrics import Metrics
from .pipeline import EpochStats, Placement
from .wire import Kind


@dataclass(frozen=True)
class WorkerGroup:
    """Workers of one device type on one host: a DeviceType of the planner's problem."""

    name: str                         # the type's name in plans: "cpu-2t" here, "cpu-1t@10.0.0.2" on a member
    host: str                         # LOCAL, or the member's address
    threads: int
    worker_ids: tuple[int, ...]
    link: Link | None = None          # to the member (None here)


class RunningEpoch(Protocol):
    """One running plan epoch, as the planner reads it (a Pipeline is one)."""

    epoch: int
    placement: Placement

    def take_stats(self) -> EpochStats:
        """The counts since the last read, and start counting afresh."""


class PlannerHost(Protocol):
    config: E3Config
    metrics: Metrics
    meta: ModelMeta
    model_dir: str
    policy: ExitPolicy
    epoch: int                        # the epoch new inputs enter
    devices: Mapping[int, str]        # worker id -> its device

    def epochs(self) -> Sequence[RunningEpoch]:
        """Every running epoch: the current one and those still draining."""

    def worker_groups(self) -> list[WorkerGroup]:
        """The workers a plan may use now, by device type: this node's first."""

    def static_placement(self) -> Placement:
        """The placement from config (no plan)."""

    async def apply(self, placement: Placement) -> int:
        """Swap to a new epoch on `placement` once its workers are ready; returns the epoch."""

    async def profile(self, worker_id: int, args: dict) -> dict:
        """Have one worker measure the model (planner/profiler.py); its profile's JSON."""

    def worker_pid(self, worker_id: int) -> int | None:
        """The worker's process id when it runs in its own process on this host, else None."""

    def worker_env(self, worker_id: int) -> Mapping[str, str] | None:
        """The environment the worker process was started with (None: the node's own)."""


class RuntimePlannerHost:
    """A Runtime and its worker pool behind PlannerHost."""

    def __init__(self, runtime):
        self._rt = runtime
        self.config, self.metrics = runtime.config, runtime.metrics

    @property
    def meta(self) -> ModelMeta:
        return self._rt.meta

    @property
    def model_dir(self) -> str:
        return self._rt.model_dir

    @property
    def policy(self) -> ExitPolicy:
        return self._rt.policy

    @property
    def epoch(self) -> int:
        return self._rt.epoch

    @property
    def devices(self) -> dict[int, str]:
        return {i: w.device for i, w in self._rt.pool.workers.items()}

    def epochs(self) -> list[RunningEpoch]:
        return list(self._rt.pipelines.values())

    def worker_groups(self) -> list[WorkerGroup]:
        """Live workers by (host, device kind, threads). A member's workers count once its link is
        measured (the planner prices its boundaries with it); a lost member's never again."""
        pool, threads = self._rt.pool, self.config.workers.threads_per_worker
        links = {p.host: p.link_cost for p in getattr(pool, "remotes", ()) if p.lost_reason is None}
        found: dict[tuple, list[tuple[int, str]]] = {}
        for i, w in sorted(pool.workers.items()):
            host = getattr(w, "host", LOCAL)
            if getattr(w, "gone", False) or (host != LOCAL and links.get(host) is None):
                continue
            found.setdefault((host, w.device.split(":")[0], getattr(w, "threads", threads)), []).append((i, w.device))
        groups = []
        for (host, kind, t), workers in sorted(found.items(), key=lambda kv: (kv[0][0] != LOCAL, kv[0])):
            name = f"{workers[0][1]}-{t}t" if host == LOCAL else f"{kind}-{t}t@{host}"
            groups.append(WorkerGroup(name, host, t, tuple(i for i, _ in workers), links.get(host)))
        return groups

    def static_placement(self) -> Placement:
        return self._rt.static_placement()

    async def apply(self, placement: Placement) -> int:
        return await self._rt.apply(placement)

    async def profile(self, worker_id: int, args: dict) -> dict:
        # A profile takes minutes on a slow CPU: the call's generous default timeout.
        reply = await self._rt.pool.call(worker_id, Kind.PROFILE, 300.0, args=args)
        return reply["profile"]

    def worker_pid(self, worker_id: int) -> int | None:
        return getattr(self._rt.pool.workers[worker_id], "pid", None)

    def worker_env(self, worker_id: int) -> Mapping[str, str] | None:
        return getattr(self._rt.pool.workers[worker_id], "env", None)
