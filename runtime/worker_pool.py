"""The workers a node serves on, behind one interface: `WorkerPool`.

The data plane (runtime.py: admission, epochs, the pump; pipeline.py: one
epoch's stages) sees a pool as a live mapping of worker handles by id, and
asks it for calls (a request and its reply: PREPARE, which maps an epoch's
rings and warms its splits, ALLOC_RING, PROFILE) and broadcasts. The pool
owns what happens to its workers: it spawns them (a worker counts as started
once its model is loaded), restarts the ones that die, kills the ones that
hang (the watchdog), and stops them in reverse order of their start. It
reports to the data plane through `PoolEvents`.

`LocalWorkerPool` runs this node's own worker processes (or inline engines).
The interface assumes nothing shared but messages: every method is async
or queues a message, ids are plain ints, fields are msgpack-able. A remote
pool (the workers of a member node reached over a link) implements it by
forwarding: `call` sends the request over the link with a call id the member
echoes, `broadcast` / `set_policy` send one message the member fans out to
its workers, `start` registers the member and waits until its workers are
warm, `drain` / `stop` tell the member to stop restarting / to stop, and a
member lost (its link closes or its lease lapses) is reported as each of
its workers lost. Its handles in `workers` are proxies whose `send` writes
to the link.
"""
from __future__ import annotations

import abc
import asyncio
import itertools
import logging
from typing import Callable, Iterable, Mapping, NamedTuple, Protocol

from .config import WorkersConfig
from .errors import WorkerFailedError
from .metrics import Metrics
from .wire import Kind
from .worker_client import InlineWorker, OnExit, OnMessage, ProcessWorker, WorkerClient, WorkerServer, worker_env

log = logging.getLogger(__name__)

# Makes the handle of worker `id` on `device`, reporting to the two callbacks (tests script workers with one).
WorkerFactory = Callable[[int, str, OnMessage, OnExit], WorkerClient]


class HeldBatch(NamedTuple):
    """A batch a worker has been sent and not answered yet (the watchdog's input)."""

    worker: WorkerClient
    batch_id: int
    split: int
    sent_at: float            # on the event loop's clock


class PoolEvents(Protocol):
    """What a pool tells the data plane (the Runtime implements it)."""

    def on_reply(self, worker: WorkerClient, msg: dict) -> None:
        """A message that answers no call: DONE / FAILED of a RUN, matched by its batch id."""

    def on_lost(self, worker: WorkerClient) -> None:
        """`worker` died; its pending calls have failed already."""

    async def on_joined(self, worker: WorkerClient) -> None:
        """A replacement is up and registered under its predecessor's id: prepare it for every
        live epoch. Raising rejects it (the pool stops it and tries again)."""

    async def on_restarted(self, worker: WorkerClient) -> None:
        """A replacement is in service and the pool no longer restarts its id."""

    def held_batches(self) -> Iterable[HeldBatch]:
        """Every batch sent and not answered yet, stale copies included."""


class WorkerPool(abc.ABC):
    """The workers the data plane sends batches to (see the module docstring)."""

    @property
    @abc.abstractmethod
    def workers(self) -> Mapping[int, WorkerClient]:
        """Live handles by worker id; a replacement takes its predecessor's id."""

    @abc.abstractmethod
    async def start(self, events: PoolEvents) -> None:
        """Start every worker and wait until each has loaded its model; on a failure, stop the
        ones that started (after every start has ended) and raise."""

    @abc.abstractmethod
    async def call(self, worker_id: int, kind: Kind, timeout_s: float, **fields) -> dict:
        """Send a request (PREPARE, ALLOC_RING, PROFILE) to the worker now under `worker_id` and
        return its reply, matched by the call id it echoes; WorkerFailedError if it answers
        FAILED, dies, or says nothing within `timeout_s`."""

    @abc.abstractmethod
    def broadcast(self, kind: Kind, **fields) -> None:
        """Queue a one-way message (RETIRE) to every live worker."""

    @abc.abstractmethod
    def set_policy(self, name: str, threshold: float) -> None:
        """Bring every worker, and every one started from now on, to this exit policy."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """The node is shutting down: replace no worker that dies from now on."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the watchdog and restarts, then the workers, then what they talk through."""


class Calls:
    """Requests waiting for their reply, by the call id the worker echoes (wire.py).

    A call remembers the worker object asked: a restarted worker has its
    predecessor's id but is another object, and a reply or a death of one
    never settles the other's calls."""

    def __init__(self):
        self._waiting: dict[int, tuple[WorkerClient, Kind, asyncio.Future]] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._waiting)

    async def ask(self, worker: WorkerClient, kind: Kind, timeout_s: float, **fields) -> dict:
        call = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[call] = (worker, kind, fut)
        try:
            worker.send(kind, call=call, **fields)
            async with asyncio.timeout(timeout_s):
                return await fut
        except asyncio.TimeoutError:
            raise WorkerFailedError(f"worker {worker.worker_id} did not answer {kind.name} "
                                    f"within {timeout_s:.0f} s") from None
        finally:
            self._waiting.pop(call, None)

    def answer(self, worker: WorkerClient, msg: dict) -> None:
        asked, kind, fut = self._waiting.get(msg["call"], (None, None, None))
        if fut is None or fut.done() or asked is not worker:
            return                        # timed out already, or not this worker's call
        if msg["k"] == Kind.FAILED:
            fut.set_exception(WorkerFailedError(f"worker {worker.worker_id} failed {kind.name}: {msg['error']}"))
        else:
            fut.set_result(msg)

    def fail_all_of(self, worker: WorkerClient) -> None:
        for asked, kind, fut in list(self._waiting.values()):
            if asked is worker and not fut.done():
                fut.set_exception(WorkerFailedError(f"worker {worker.worker_id} died before answering {kind.name}"))


class Background:
    """Recovery tasks that stop with their owner."""

    def __init__(self):
        self._tasks: set[asyncio.Task] = set()

    def run(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class LocalWorkerPool(WorkerPool):
    """This node's workers: one process per device (or inline engines on threads)."""

    def __init__(self, config: WorkersConfig, metrics: Metrics, *, model=None, policy: tuple[str, float],
                 make_worker: WorkerFactory | None = None):
        """`model`: the LoadedModel (inline engines run its model object; processes load its
        directory). `make_worker`: make handles another way (scripted workers in tests)."""
        self.config, self.metrics = config, metrics
        self._model, self._policy, self._make = model, policy, make_worker
        self._events: PoolEvents | None = None
        self._workers: dict[int, WorkerClient] = {}
        self._server: WorkerServer | None = None
        self._calls = Calls()
        self._recovery = Background()
        self._restarting: set[int] = set()      # worker ids with a restart loop running
        self._watchdog: asyncio.Task | None = None
        self._closing = False

    @property
    def workers(self) -> Mapping[int, WorkerClient]:
        return self._workers

    @property
    def pending_calls(self) -> int:
        return len(self._calls)

    # -- lifecycle ---------------------------------------------------------

    async def start(self, events: PoolEvents) -> None:
        self._events = events
        if self.config.mode == "process" and self._make is None:
            self._server = WorkerServer()
            await self._server.start()
        devices = self.config.resolved_devices()
        # Filled in place: epochs hold this mapping and see replacements as they join.
        self._workers.update((i, self._make_worker(i, d)) for i, d in enumerate(devices))
        started = await asyncio.gather(*(w.start() for w in self._workers.values()), return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:     # wait for every start to end first: a worker still starting would outlive stop()
            await asyncio.gather(*(w.stop() for w in self._workers.values()), return_exceptions=True)
            raise failed[0]
        self._watchdog = asyncio.create_task(self._watch(), name="e3-watchdog")

    async def drain(self) -> None:
        self._closing = True

    async def stop(self) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        await self._recovery.cancel()
        await asyncio.gather(*(w.stop() for w in self._workers.values()), return_exceptions=True)
        if self._server is not None:
            server, self._server = self._server, None
            await server.close()

    # -- messages ----------------------------------------------------------

    async def call(self, worker_id: int, kind: Kind, timeout_s: float, **fields) -> dict:
        return await self._calls.ask(self._workers[worker_id], kind, timeout_s, **fields)

    def broadcast(self, kind: Kind, **fields) -> None:
        for w in self._workers.values():
            if w.alive:
                w.send(kind, **fields)

    def set_policy(self, name: str, threshold: float) -> None:
        self._policy = (name, float(threshold))
        self.broadcast(Kind.POLICY, name=name, threshold=float(threshold))

    def _on_message(self, worker: WorkerClient, msg: dict) -> None:
        if msg.get("call") is not None:
            self._calls.answer(worker, msg)
        else:
            self._events.on_reply(worker, msg)

    # -- deaths and restarts -----------------------------------------------

    def _make_worker(self, worker_id: int, device: str) -> WorkerClient:
        if self._make is not None:
            return self._make(worker_id, device, self._on_message, self._on_exit)
        wc = self.config
        if wc.mode == "inline":
            from e3.models.policies import make_policy
            from .engine import WorkerEngine
            engine = WorkerEngine(self._model.model, make_policy(*self._policy), device)
            return InlineWorker(worker_id, engine, self._on_message, self._on_exit)
        cpu_workers = sum(d == "cpu" for d in wc.resolved_devices())
        env = worker_env(wc.threads_per_worker, cpu_workers, wc.omp_wait_policy) if device == "cpu" else None
        return ProcessWorker(worker_id, device, self._server, str(self._model.path), self._policy,
                             wc.threads_per_worker, self._on_message, self._on_exit, wc.start_timeout_s, env)

    def _on_exit(self, worker: WorkerClient) -> None:
        log.error("worker %d on %s died", worker.worker_id, worker.device)
        self.metrics.worker_died()
        self._calls.fail_all_of(worker)
        self._events.on_lost(worker)
        if self.config.restart and not self._closing and worker.worker_id not in self._restarting:
            self._recovery.run(self._restart(worker))     # else its running loop retries

    async def _restart(self, dead: WorkerClient) -> None:
        """Replace a dead worker and have the data plane prepare it; retry until closing."""
        self._restarting.add(dead.worker_id)
        worker, delay = None, 0.1
        try:
            while not self._closing:
                worker = await self._restart_once(dead)
                if worker is not None:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._restarting.discard(dead.worker_id)
        if worker is not None and not self._closing:
            await self._events.on_restarted(worker)

    async def _restart_once(self, dead: WorkerClient) -> WorkerClient | None:
        worker = self._make_worker(dead.worker_id, dead.device)
        try:
            await worker.start()
            # Registered before it is prepared: a plan swap from now on prepares it too, and
            # on_joined prepares it for the epochs that exist (it gets no batch of an epoch
            # until prepared for it). Its policy first: messages keep their order.
            self._workers[dead.worker_id] = worker
            worker.send(Kind.POLICY, name=self._policy[0], threshold=float(self._policy[1]))
            await self._events.on_joined(worker)
        except BaseException as exc:
            await worker.stop()               # never leave a half-started process behind
            if not isinstance(exc, Exception):
                raise                         # cancelled by stop()
            log.error("restarting worker %d failed: %s", dead.worker_id, exc)
            return None
        log.warning("worker %d restarted", dead.worker_id)
        self.metrics.worker_restarted()
        return worker

    # -- the watchdog ------------------------------------------------------

    async def _watch(self) -> None:
        """Kill worker processes that hold a batch past workers.batch_timeout_s.

        A dead worker closes its socket and is handled at once; a hung one (deadlocked,
        stopped, swapping) would keep its batches, slots and epoch forever. Its batches were
        sent again elsewhere after their hedge time (pipeline.py), so their rows are answered;
        killing it hands it to the death path, which frees what its stale copies hold and
        restarts it. Inline workers run on the node's own threads and cannot be killed."""
        limit = self.config.batch_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            try:
                self._kill_hung(asyncio.get_running_loop().time(), limit)
            except Exception:     # the watchdog must outlive its own bugs
                log.exception("the worker watchdog failed")

    def _kill_hung(self, now: float, limit: float) -> None:
        hung = {h.worker: h for h in self._events.held_batches()
                if h.worker.own_process and now - h.sent_at > limit}
        for worker, held in hung.items():
            if worker.alive and not worker.killed:     # killed once: its death may take a tick to be seen
                log.error("worker %d has held batch %d of split %d for %.1f s (limit %.1f s): killing it",
                          worker.worker_id, held.batch_id, held.split, now - held.sent_at, limit)
                self.metrics.worker_hung()
                worker.kill()
