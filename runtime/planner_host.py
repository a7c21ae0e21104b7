"""What the planner actor sees of the node: `PlannerHost`.

The actor reads the config, the model's metadata, the metrics, each running
epoch's counts and timings, and the workers' devices; it calls for a
profile on one worker and for a placement to be applied. Nothing else of the
Runtime reaches it, so a coordinator planning over a cluster's members can
stand behind the same interface.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from e3.models.base import ModelMeta
from e3.models.policies import ExitPolicy

from .config import E3Config
from .metrics import Metrics
from .pipeline import EpochStats, Placement
from .wire import Kind


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
