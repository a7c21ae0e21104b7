"""The workers of member nodes, behind the same `WorkerPool` interface as this node's own.

`RemoteWorkerPool` is one member's workers as the coordinator's data plane
sees them: `RemoteWorker` handles whose `send` writes a frame to the member's
link (link.py). The pipeline is unchanged: it names rows by ring slot, as for
a local worker, and the handle turns names into bytes:

- RUN: the handle reads the batch's input rows out of this node's rings and
  sends them with the message (one data frame, one credit); the member
  writes them into its mirror of the ring at the same slots and runs the
  message on its worker unchanged.
- DONE: the member sends the survivors' rows back with the reply; the pool
  writes them into this node's ring at the slot the RUN named, then hands the
  reply to the data plane as a local worker's would be.
- Calls (PREPARE, PROFILE) go out with a call id the member echoes; a
  PREPARE's rings are mapped here too, so that RUN and DONE can read and
  write them.

A member lost (its link closed, its lease lapsed) is reported as each of its
workers lost, for good (`gone`): the pipeline retries their batches on other
replicas or fails them, never leaves them waiting. A member that comes back
joins anew, with new worker ids.

`ClusterPool` joins this node's `LocalWorkerPool` and the members' pools into
one live mapping of worker ids, which is what the Runtime serves on.
"""
from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterator, Mapping

from e3.models.state import BatchState
from e3.planner.problem import Link as PlannerLink

from .errors import NotReadyError, WorkerFailedError
from .link import Link, LinkClosedError, LinkFullError, LinkKind
from .metrics import Metrics
from .slots import RingSpec, SlotRing
from .wire import Kind
from .worker_client import OnExit, OnMessage, WorkerClient
from .worker_pool import Background, Calls, LocalWorkerPool, PoolEvents, WorkerPool

log = logging.getLogger(__name__)


class RemoteWorker(WorkerClient):
    """A member's worker: messages go over the member's link (see the module docstring)."""

    own_process = False     # not ours to kill, and no CUDA ring spans hosts

    def __init__(self, worker_id: int, local_id: int, device: str, threads: int, host: str,
                 pool: "RemoteWorkerPool", on_message: OnMessage, on_exit: OnExit):
        super().__init__(worker_id, device, on_message, on_exit)
        self.local_id, self.threads, self.host, self._pool = local_id, threads, host, pool
        self.gone = False            # its member is lost: it never comes back under this id
        # (epoch, batch id) -> the RUN's dst (ring, slot): batch ids repeat across epochs
        self._runs: dict[tuple[int, int], tuple[str, int] | None] = {}

    async def start(self) -> None:
        self.alive = True            # the member started its worker before it said READY

    async def stop(self) -> None:
        self.alive = False           # the member stops its own workers

    def send(self, kind: Kind, **fields) -> None:
        if not self.alive:
            raise NotReadyError(f"worker {self.worker_id} (on member {self.host}) is not running")
        tensors = []
        if kind == Kind.RUN:
            tensors = self._pool.read_rows(fields["src"])
            self._runs[fields["epoch"], fields["id"]] = tuple(fields["dst"]) if fields.get("dst") is not None else None
        try:
            self._pool.link.send(LinkKind.TO_WORKER, tensors, data=kind == Kind.RUN, w=self.local_id,
                                 m={"k": int(kind), **fields})
        except LinkClosedError:
            # The member is being lost: its loss retries this batch; a call fails with it.
            if kind != Kind.RUN:
                raise
        except LinkFullError as exc:
            log.error("member %s: %s; giving it up", self.host, exc)
            self._pool.lose(str(exc))

    def take_run(self, epoch: int, batch_id: int) -> tuple[str, int] | None:
        return self._runs.pop((epoch, batch_id), None)

    def lost(self) -> None:
        """The member is lost: report this worker lost, once."""
        self._runs.clear()
        if self.alive:
            self.alive, self.gone = False, True
            self.on_exit(self)
        self.gone = True


class RemoteWorkerPool(WorkerPool):
    """One member's workers, reached over its link."""

    def __init__(self, host: str, link: Link, specs: list[dict], ids: Iterator[int], metrics: Metrics,
                 call_timeout_s: float):
        """`specs`: the member's READY workers ({id, device, threads}); `ids`: global worker ids."""
        self.host, self.link, self.metrics = host, link, metrics
        self._specs = specs
        self._ids = ids
        self._call_timeout_s = call_timeout_s
        self._workers: dict[int, RemoteWorker] = {}
        self._by_local: dict[int, int] = {}
        self._rings: dict[str, SlotRing] = {}
        self._calls = Calls()
        self._events: PoolEvents | None = None
        self._recovery = Background()
        self.lost_reason: str | None = None
        self._quietly = False
        # What a message to the member costs, as the planner prices it: set once the link is measured.
        self.link_cost: PlannerLink | None = None

    @property
    def workers(self) -> Mapping[int, RemoteWorker]:
        return self._workers

    async def start(self, events: PoolEvents) -> None:
        self._events = events
        for spec in self._specs:
            worker = self._make(next(self._ids), spec)
            self._workers[worker.worker_id] = worker
            self._by_local[worker.local_id] = worker.worker_id
            await worker.start()

    def _make(self, worker_id: int, spec: dict) -> RemoteWorker:
        return RemoteWorker(worker_id, int(spec["id"]), str(spec["device"]), int(spec.get("threads", 1)), self.host,
                            self, self._on_message, self._on_exit)

    async def call(self, worker_id: int, kind: Kind, timeout_s: float, **fields) -> dict:
        if kind == Kind.PREPARE:
            for d in fields.get("rings", ()):
                if d["id"] not in self._rings and d.get("cuda") is None:
                    self._rings[d["id"]] = SlotRing.attach(RingSpec.from_wire(d))
        return await self._calls.ask(self._workers[worker_id], kind, timeout_s, **fields)

    def broadcast(self, kind: Kind, **fields) -> None:
        for w in self._workers.values():
            if w.alive:
                w.send(kind, **fields)
        if kind == Kind.RETIRE:
            for ring_id in fields.get("rings", ()):
                ring = self._rings.pop(ring_id, None)
                if ring is not None:
                    ring.close()

    def set_policy(self, name: str, threshold: float) -> None:
        try:
            self.link.send(LinkKind.POLICY, name=name, threshold=float(threshold))
        except LinkClosedError:
            pass                # a lost member gets the policy when it joins again

    async def drain(self) -> None:
        """Nothing to do here: the member restarts its own workers as long as it runs."""

    async def stop(self) -> None:
        await self._recovery.cancel()
        await self.link.close("the coordinator is stopping")
        self.lose("the coordinator stopped")

    # -- rows across the link ------------------------------------------------

    def read_rows(self, segments: list) -> list:
        """The tensors a RUN's input rows travel as: per segment, each field of its ring."""
        out = []
        for ring_id, slot, start, count in segments:
            out.extend(t for _, t in self._rings[ring_id].read(slot, start, count).items())
        return out

    def _write_survivors(self, dst: tuple[str, int], rows: int, tensors: list) -> None:
        ring = self._rings[dst[0]]
        names = [f.name for f in ring.spec.fields]
        if len(tensors) != len(names) or any(t.shape[0] != rows for t in tensors):
            raise WorkerFailedError(f"member {self.host} sent {len(tensors)} survivor tensors for "
                                    f"{rows} rows of ring {dst[0]} ({len(names)} fields)")
        ring.write(dst[1], 0, BatchState(dict(zip(names, tensors))))

    # -- frames from the member ----------------------------------------------

    def on_frame(self, header: dict, tensors: list) -> None:
        kind = header["k"]
        if kind == LinkKind.FROM_WORKER:
            self._from_worker(header, tensors)
        elif kind == LinkKind.WORKER_LOST:
            worker = self._local(header["w"])
            if worker is not None:
                worker._runs.clear()
                if worker.alive:
                    worker.alive = False
                    worker.on_exit(worker)
        elif kind == LinkKind.WORKER_BACK:
            self._recovery.run(self._worker_back(header["w"]))

    def _local(self, local_id) -> RemoteWorker | None:
        return self._workers.get(self._by_local.get(local_id))

    def _from_worker(self, header: dict, tensors: list) -> None:
        try:
            worker, msg = self._local(header["w"]), dict(header["m"])
            msg["k"] = Kind(msg["k"])
            if worker is None:
                return
            if msg["k"] in (Kind.DONE, Kind.FAILED) and msg.get("call") is None:
                dst = worker.take_run(msg.get("epoch"), msg.get("id"))
                if msg["k"] == Kind.DONE and dst is not None and msg["survivors"]:
                    self._write_survivors(dst, len(msg["survivors"]), tensors)
            worker._deliver(msg)
        finally:
            if header.get("data"):
                self.link.grant(1)

    async def _worker_back(self, local_id: int) -> None:
        """The member restarted a worker: a new handle under the same id, prepared like a local
        replacement (PoolEvents.on_joined), then in service."""
        old = self._local(local_id)
        if old is None or old.gone or self.lost_reason is not None:
            return
        worker = self._make(old.worker_id, {"id": local_id, "device": old.device, "threads": old.threads})
        await worker.start()
        self._workers[old.worker_id] = worker
        try:
            await self._events.on_joined(worker)
        except Exception as exc:
            log.error("preparing member %s's restarted worker %d failed: %s", self.host, old.worker_id, exc)
            worker.alive = False
            self._calls.fail_all_of(worker)
            self._events.on_lost(worker)
            return
        await self._events.on_restarted(worker)

    def _on_message(self, worker: WorkerClient, msg: dict) -> None:
        if msg.get("call") is not None:
            self._calls.answer(worker, msg)
        else:
            self._events.on_reply(worker, msg)

    def _on_exit(self, worker: WorkerClient) -> None:
        (log.info if self._quietly else log.error)("worker %d on member %s lost", worker.worker_id, self.host)
        self.metrics.worker_died()
        self._calls.fail_all_of(worker)
        self._events.on_lost(worker)

    def lose(self, reason: str, quietly: bool = False) -> None:
        """The member is gone: every worker lost for good, this node's mappings of rings closed.
        `quietly`: it left cleanly (said goodbye), which is no error."""
        self._quietly = quietly
        if self.lost_reason is None:
            self.lost_reason = reason
        for w in list(self._workers.values()):
            w.lost()
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()


class _Workers(Mapping):
    """A live view of every pool's workers by id (epochs hold it and see joins and restarts)."""

    def __init__(self, pools: list[WorkerPool]):
        self._pools = pools

    def __getitem__(self, worker_id: int) -> WorkerClient:
        for pool in self._pools:
            w = pool.workers.get(worker_id)
            if w is not None:
                return w
        raise KeyError(worker_id)

    def __iter__(self):
        for pool in self._pools:
            yield from pool.workers

    def __len__(self) -> int:
        return sum(len(p.workers) for p in self._pools)


class ClusterPool(WorkerPool):
    """The coordinator's workers: its own (a LocalWorkerPool) and every member's."""

    def __init__(self, local: LocalWorkerPool | Callable[[], LocalWorkerPool], first_remote_id: int = 1000):
        """`local`: this node's pool, or what makes it at start (once the Runtime has loaded the model)."""
        self._make_local = local if callable(local) and not isinstance(local, WorkerPool) else None
        self.local = None if self._make_local else local
        self.remotes: list[RemoteWorkerPool] = []
        self._pools: list[WorkerPool] = [] if self.local is None else [self.local]
        self._workers = _Workers(self._pools)
        self._events: PoolEvents | None = None
        self._policy: tuple[str, float] | None = None
        # Remote ids never repeat: a worker of a lost member must not be taken for a new one.
        self.ids = itertools.count(first_remote_id)

    @property
    def workers(self) -> Mapping[int, WorkerClient]:
        return self._workers

    async def start(self, events: PoolEvents) -> None:
        self._events = events
        if self.local is None:
            self.local = self._make_local()
            self._pools.insert(0, self.local)
        await self.local.start(events)

    async def add(self, pool: RemoteWorkerPool) -> None:
        """Serve on a member's workers from now on (the coordinator then re-plans)."""
        await pool.start(self._events)
        if self._policy is not None:
            pool.set_policy(*self._policy)
        self.remotes.append(pool)
        self._pools.append(pool)

    def _owner(self, worker_id: int) -> WorkerPool:
        for pool in self._pools:
            if worker_id in pool.workers:
                return pool
        raise KeyError(worker_id)

    async def call(self, worker_id: int, kind: Kind, timeout_s: float, **fields) -> dict:
        return await self._owner(worker_id).call(worker_id, kind, timeout_s, **fields)

    def broadcast(self, kind: Kind, **fields) -> None:
        for pool in self._pools:
            pool.broadcast(kind, **fields)

    def set_policy(self, name: str, threshold: float) -> None:
        self._policy = (name, float(threshold))
        for pool in self._pools:
            pool.set_policy(name, threshold)

    async def drain(self) -> None:
        for pool in self._pools:
            await pool.drain()

    async def stop(self) -> None:
        for pool in reversed(self.remotes):      # reverse order of start: members, then our own
            await pool.stop()
        if self.local is not None:
            await self.local.stop()
