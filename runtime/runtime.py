"""The E3 runtime: the sidecar API, and what the HTTP endpoint wraps.

    async with Runtime(config) as rt:
        results = await rt.infer([x1, x2])

The Runtime is the data plane: admission, plan epochs (pipeline.py) and the
pump. It reaches its workers only through a `WorkerPool` (worker_pool.py),
which owns their lifecycle (spawn, restart, the watchdog, calls by call id);
the planner actor sees it through a `PlannerHost` (planner_host.py).

Lifecycle (explicit, reverse order on the way down): resolve and load the
model (for encoding and metadata), start the pool (its socket and workers),
apply the first placement (workers prepare and warm before it takes
traffic), start the planner actor. `close()` stops admitting and restarting,
drains what is in flight, then stops the planner, the epochs and the pool.

Hot swap: `apply(placement)` builds a new epoch, has every worker map its
rings and warm its splits, and only then routes new inputs to it. Inputs
already inside the old epoch finish there; it retires once idle. Every
accepted input gets exactly one answer (`Sample.answer` / `fail` refuse a
second one).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

from e3.models.registry import LoadedModel, load_model, resolve

from .batcher import Sample
from .config import E3Config
from .errors import ConfigError, ConflictError, DeadlineExceededError, NotReadyError, WorkerFailedError
from .metrics import Metrics
from .pipeline import Pipeline, Placement, Result
from .planner_host import RuntimePlannerHost
from .slots import RingSpec
from .wire import Kind
from .worker_client import WorkerClient
from .worker_pool import Background, HeldBatch, LocalWorkerPool, WorkerPool

log = logging.getLogger(__name__)



class Runtime:
    """Serves one early-exit model on a pool of workers."""

    def __init__(self, config: E3Config | None = None, *, model: LoadedModel | None = None,
                 metrics: Metrics | None = None, planner_factory: Callable[[Any], Any] | None = None,
                 pool: WorkerPool | None = None):
        """`model`: an already loaded model object to serve instead of `config.model`
        (inline workers only: worker processes load their model from a directory).
        `planner_factory`: makes the planner actor from a PlannerHost. `pool`: the workers to
        serve on, started by start(); None for this node's own, made from `config.workers`."""
        self.config = (config or E3Config()).validate()
        if model is not None and self.config.workers.mode != "inline":
            raise ConfigError("a model object can only be served with workers.mode 'inline'")
        if planner_factory is not None and self.config.batching.cuts is not None and not self.config.replan.observe:
            # The planner chooses the splits; fixed cuts would be silently dropped.
            raise ConfigError(f"batching.cuts {self.config.batching.cuts} fixes the splits, but a planner "
                              "chooses them: drop cuts, serve without re-planning (--no-replan), or let it only observe (--observe)")
        self.metrics = metrics or Metrics()
        self._planner_factory = planner_factory
        self.planner = None
        self.loaded = model
        self.pool = pool
        self.pipelines: dict[int, Pipeline] = {}
        self.epoch = -1
        self._rids = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._kicked = False
        self._accepting = False
        self._closing = False
        self._swap_lock = asyncio.Lock()
        self._recovery = Background()

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> "Runtime":
        try:
            await self.start()
        except BaseException:     # __aexit__ will not run: release what started (socket dir, rings)
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        mc = self.config.model
        if self.loaded is None:
            model_dir = await loop.run_in_executor(None, resolve, mc.path)
            self.loaded = await loop.run_in_executor(
                None, lambda: load_model(model_dir, "cpu", mc.policy, mc.threshold))
        self.model_dir = str(self.loaded.path)
        if self.pool is None:
            self.pool = LocalWorkerPool(self.config.workers, self.metrics, model=self.loaded,
                                        policy=(self.policy.name, self.policy.threshold))
        await self.pool.start(self)
        if self._planner_factory is not None:
            self.planner = self._planner_factory(RuntimePlannerHost(self))
            placement = await self.planner.initial_placement()
        else:
            placement = self.static_placement()
        await self.apply(placement)
        self._accepting = True
        if self.planner is not None:
            await self.planner.start()

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop admitting, drain in-flight inputs, then stop everything in reverse order."""
        if self._closing:
            return
        self._accepting, self._closing = False, True
        if self.pool is not None:
            await self.pool.drain()
        await self.drain(drain_timeout_s)
        if self.planner is not None:
            await self.planner.stop()
        await self._recovery.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for pipeline in self.pipelines.values():
            pipeline.close()
        self.pipelines.clear()
        if self.pool is not None:
            await self.pool.stop()

    async def drain(self, timeout_s: float) -> None:
        """Wait until no input is queued or in flight (or the timeout passes)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        for p in self.pipelines.values():
            p.draining = True
        self._kick()
        while any(not p.idle() for p in self.pipelines.values()) and loop.time() < end:
            await asyncio.sleep(0.005)
        for p in self.pipelines.values():   # whatever is left gets an answer, never silence
            for stage in p.stages:
                for row in stage.queue.take_all():
                    p.on_answer(row.sample, NotReadyError("the runtime shut down before this input ran"))

    @property
    def workers(self) -> Mapping[int, WorkerClient]:
        """The pool's workers by id (read-only: the pool replaces the ones that die)."""
        return self.pool.workers if self.pool is not None else {}

    @property
    def ready(self) -> bool:
        return self._accepting and self.epoch in self.pipelines and any(w.alive for w in self.workers.values())

    @property
    def meta(self):
        return self.loaded.model.meta

    @property
    def policy(self):
        return self.loaded.policy

    @property
    def placement(self) -> Placement | None:
        p = self.pipelines.get(self.epoch)
        return p.placement if p else None

    def static_placement(self) -> Placement:
        """The placement from config (batch, cuts) with every split on every worker."""
        from e3.models.executor import splits_from_cuts
        b = self.config.batching
        splits = splits_from_cuts(self.meta, b.cuts or [])
        ids = tuple(self.workers)
        return Placement(b.batch or 8, tuple((s.first, s.last) for s in splits), tuple(ids for _ in splits))

    # -- inference ---------------------------------------------------------

    async def infer(self, inputs: Sequence[Any], timeout_s: float | None = None) -> list[Result]:
        """Answer a list of inputs; raises the first input's error if any failed."""
        if not self.ready:
            self.metrics.rejected("NotReadyError", len(inputs))
            raise NotReadyError("the runtime is not ready (starting, stopping, or no live worker)")
        loop = asyncio.get_running_loop()
        b = self.config.batching
        timeout_s = b.timeout_ms / 1000 if timeout_s is None else timeout_s
        state = self.loaded.model.encode(inputs)
        if self.policy.state_fields():
            state = state.replace(**self.policy.init_fields(state.rows))
        now = loop.time()
        flush_by = now + b.slo_ms / 1000 * (1 - b.slo_reserve)
        samples = [Sample(next(self._rids), loop.create_future(), now, flush_by,
                          now + timeout_s, self.epoch, state.select([i])) for i in range(state.rows)]
        try:
            self.pipelines[self.epoch].admit(samples)
        except Exception as exc:
            self.metrics.rejected(type(exc).__name__, len(samples))
            raise
        self.metrics.admitted(len(samples))
        self._kick()
        return await self._collect(samples, timeout_s)

    async def _collect(self, samples: list[Sample], timeout_s: float) -> list[Result]:
        futures = [s.future for s in samples]
        # The safety net: whatever happens below, no caller waits past its deadline.
        done, pending = await asyncio.wait(futures, timeout=timeout_s + 0.5)
        for s in samples:
            if s.fail(DeadlineExceededError(f"no answer within {timeout_s:.3f} s")):
                self.metrics.failed("DeadlineExceededError")
        outcomes = [f.exception() or f.result() for f in futures]
        for o in outcomes:
            if isinstance(o, BaseException):
                raise o
        return outcomes

    def _on_answer(self, sample: Sample, outcome: Result | BaseException) -> None:
        loop_now = asyncio.get_running_loop().time()
        if isinstance(outcome, BaseException):
            if sample.fail(outcome):
                self.metrics.failed(type(outcome).__name__)
        elif sample.answer(outcome):
            latency = loop_now - sample.arrived
            self.metrics.answered(outcome.exit_point, latency, latency <= self.config.batching.slo_ms / 1000)
        else:   # a result after the deadline's answer is late; after another result, a bug
            late = sample.future.exception() is not None
            self.metrics.dropped_answer(late)
            if not late:
                log.error("input %d got a second result (epoch %d); the first stands", sample.rid, sample.epoch)

    async def set_policy(self, name: str, threshold: float) -> None:
        """Change the exit policy or its threshold on the node and every worker."""
        from e3.models.policies import make_policy
        if name == self.policy.name:
            self.policy.set_threshold(threshold)
        else:
            if make_policy(name, threshold).state_fields() != self.policy.state_fields():
                raise ConflictError(f"policy {name!r} keeps other state than {self.policy.name!r}: "
                                    "switching needs a restart with model.policy set")
            self.loaded.policy = make_policy(name, threshold)
        if self.pool is not None:
            self.pool.set_policy(self.policy.name, float(self.policy.threshold))

    # -- plans and epochs --------------------------------------------------

    async def apply(self, placement: Placement) -> int:
        """Start a new epoch on `placement` once every worker is ready for it."""
        async with self._swap_lock:
            epoch = self.epoch + 1
            pipeline = self._pipeline(epoch, placement)
            try:
                await self._allocate_rings(pipeline)
                await asyncio.gather(*(self._prepare(w, pipeline) for w in self.workers.values() if w.alive))
            except BaseException:
                self._discard(pipeline)
                raise
            self._enter(epoch, pipeline)
            self.metrics.plan_applied(epoch, placement)
            self._kick()
            return epoch

    def _pipeline(self, epoch: int, placement: Placement) -> Pipeline:
        c = self.config
        return Pipeline(epoch, self.meta, self.policy, placement, self.workers,
                        admission_rows=c.batching.max_queue, slots_per_ring=c.batching.slots_per_ring,
                        sample_fraction=c.batching.sample_fraction, max_inflight=c.workers.max_inflight,
                        max_attempts=c.workers.max_attempts, on_answer=self._on_answer, seed=epoch,
                        rebatch=c.batching.rebatch, work_conserving=c.batching.work_conserving,
                        admission_delay_s=c.batching.queue_delay_s,
                        hedge_factor=c.workers.hedge_factor if c.workers.hedge else None,
                        hedge_floor_s=c.workers.hedge_floor_s, on_hedge=self.metrics.batch_hedged)

    def _enter(self, epoch: int, pipeline: Pipeline) -> None:
        """Route new inputs to `pipeline`; the old epoch's unstarted inputs move with them."""
        old = self.pipelines.get(self.epoch)
        self.pipelines[epoch] = pipeline
        self.epoch = epoch
        if old is not None:
            old.draining = True
            moved = old.take_unstarted()
            for s in moved:
                s.epoch = epoch
            pipeline.admit(moved)

    async def _prepare(self, worker: WorkerClient, pipeline: Pipeline) -> None:
        await self.pool.call(worker.worker_id, Kind.PREPARE, self.config.workers.start_timeout_s,
                             epoch=pipeline.epoch, batch=pipeline.placement.batch,
                             rings=pipeline.ring_specs(worker.worker_id), splits=pipeline.splits_on(worker.worker_id))
        pipeline.prepared.add(worker)

    async def _allocate_rings(self, pipeline: Pipeline) -> None:
        """Have each owner allocate its CUDA rings of `pipeline`, before any PREPARE names them."""
        by_owner: dict[int, list] = {}
        for ring in pipeline.cuda_rings():
            by_owner.setdefault(ring.owner_id, []).append(ring)
        await asyncio.gather(*(self._allocate_on(w, pipeline.epoch, rings) for w, rings in by_owner.items()))

    async def _allocate_on(self, worker_id: int, epoch: int, rings: list) -> None:
        reply = await self.pool.call(worker_id, Kind.ALLOC_RING, self.config.workers.start_timeout_s,
                                     epoch=epoch, owner=worker_id,
                                     rings=[{"ring": r.spec.to_wire(), "share": r.share} for r in rings])
        if len(reply["rings"]) != len(rings):
            raise WorkerFailedError(f"worker {worker_id} allocated {len(reply['rings'])} of {len(rings)} rings")
        for ring, d in zip(rings, reply["rings"]):
            ring.set_allocated(RingSpec.from_wire(d))

    def _discard(self, pipeline: Pipeline) -> None:
        """Drop an epoch that never started; workers free the CUDA rings they allocated or opened for it."""
        cuda_ids = [r.spec.ring_id for r in pipeline.cuda_rings()]
        if cuda_ids:
            self.pool.broadcast(Kind.RETIRE, rings=cuda_ids)
        pipeline.close()

    def _retire_drained(self) -> None:
        for epoch, p in list(self.pipelines.items()):
            if epoch != self.epoch and p.draining and p.idle() and not p.holds_stale():
                self.pool.broadcast(Kind.RETIRE, rings=p.ring_ids())
                p.close()
                del self.pipelines[epoch]

    async def _replace_broken_epoch(self) -> None:
        """An epoch whose CUDA ring died with its owner: re-apply its placement on fresh rings
        (apply moves the inputs it had not started)."""
        current = self.pipelines.get(self.epoch)
        if current is None or not current.lost_rings or self._closing:
            return
        try:
            await self.apply(current.placement)
        except Exception as exc:
            log.error("replacing epoch %d after losing its GPU rings failed: %s", current.epoch, exc)

    # -- the pool's events (worker_pool.PoolEvents) ------------------------

    def on_reply(self, worker: WorkerClient, msg: dict) -> None:
        pipeline = self.pipelines.get(msg.get("epoch"))
        if pipeline is None:
            return
        if msg["k"] == Kind.DONE:
            done = pipeline.on_done(msg, asyncio.get_running_loop().time(), worker)
            if done is not None:                  # None: a stale reply, already retried elsewhere
                self.metrics.batch_done(*done, msg)
        elif msg["k"] == Kind.FAILED:
            pipeline.on_failed(msg, worker)
        self._kick()

    def on_lost(self, worker: WorkerClient) -> None:
        broken = [p.on_worker_lost(worker.worker_id) for p in self.pipelines.values()]
        if any(broken):
            log.error("worker %d owned GPU rings: rows that need them fail, and a current epoch is replaced",
                      worker.worker_id)
        self._kick()
        current = self.pipelines.get(self.epoch)
        # A restarted worker replaces the broken epoch once it is up (on_restarted).
        if not self.config.workers.restart and current is not None and current.lost_rings and not self._closing:
            self._recovery.run(self._replace_broken_epoch())

    async def on_joined(self, worker: WorkerClient) -> None:
        # Under the swap lock: no plan swap runs while it is prepared, so it ends up prepared
        # for exactly the epochs that exist (a swap before this took it already).
        async with self._swap_lock:
            for p in list(self.pipelines.values()):
                if not p.lost_rings and worker not in p.prepared:   # a lost ring's handles point into a dead process
                    await self._prepare(worker, p)

    async def on_restarted(self, worker: WorkerClient) -> None:
        self._kick()
        await self._replace_broken_epoch()

    def held_batches(self) -> Iterable[HeldBatch]:
        return [HeldBatch(c.worker, b.bid, s.index, c.sent_at)
                for p in self.pipelines.values() for s, b, c in p.copies_out()]

    # -- the pump ----------------------------------------------------------

    def _kick(self) -> None:
        """Run the pump soon (coalesced: many events, one pump)."""
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._kicked = False
        loop = asyncio.get_running_loop()
        now = loop.time()
        wake = None
        for p in list(self.pipelines.values()):
            try:
                t = p.pump(now)
            except Exception:   # the pump must survive its own bugs, or every request hangs
                log.exception("pump of epoch %d failed", p.epoch)
                t = now + 0.01
            wake = t if wake is None or (t is not None and t < wake) else wake
        self._retire_drained()
        self.metrics.queues(self.pipelines.get(self.epoch), now)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake is not None:
            # A flush that is due but blocked (no free worker or slot) is
            # retried by the event that unblocks it; poll gently meanwhile.
            self._timer = loop.call_at(max(wake, now + 0.002), self._pump)
