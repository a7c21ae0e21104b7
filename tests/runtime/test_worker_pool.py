"""The worker pool: calls matched by call id, deaths, restarts, the watchdog, stop.

Here the pool runs scripted workers (they record what they are sent; the test
answers or kills them) or inline engines on the small MLP, and a `Recorder`
stands where the data plane is and records what the pool reports. Real worker
processes: tests/e2e/test_worker_pool.py.
"""
import asyncio
import os
from pathlib import Path

import pytest

from e3.models.policies import make_policy
from e3.models.registry import LoadedModel
from e3.runtime.config import WorkersConfig
from e3.runtime.errors import WorkerFailedError
from e3.runtime.metrics import Metrics
from e3.runtime.wire import Kind, pack, read_frame
from e3.runtime.worker_client import WorkerClient, WorkerServer
from e3.runtime.worker_pool import Calls, HeldBatch, LocalWorkerPool
from tests.support.mlp import MLPModel


class Recorder:
    """Scripted stand-in for the data plane (PoolEvents): records what the pool reports."""

    def __init__(self, join_failures=0):
        self.replies, self.lost, self.joined, self.restarted = [], [], [], []
        self.held: list[HeldBatch] = []
        self.join_failures = join_failures

    def on_reply(self, worker, msg):
        self.replies.append((worker, msg))

    def on_lost(self, worker):
        self.lost.append(worker)

    async def on_joined(self, worker):
        self.joined.append(worker)
        if self.join_failures:
            self.join_failures -= 1
            raise WorkerFailedError(f"worker {worker.worker_id} failed PREPARE: scripted")

    async def on_restarted(self, worker):
        self.restarted.append(worker)

    def held_batches(self):
        return list(self.held)


class Scripted(WorkerClient):
    """A worker process as the pool sees it, driven by the test: it records what it is sent,
    answers when told, and dies (closes its socket) when killed."""

    own_process = True

    def __init__(self, worker_id, device, on_message, on_exit, log):
        super().__init__(worker_id, device, on_message, on_exit)
        self.sent, self.log = [], log

    async def start(self):
        self.alive = True
        self.log.append(("start", self))

    def send(self, kind, **fields):
        self.sent.append((kind, fields))

    async def stop(self):
        self.alive = False
        self.log.append(("stop", self))

    def kill(self):
        self.killed = True
        self.die()

    def die(self):
        """What the socket reader does when the process is gone."""
        self.alive = False
        asyncio.get_running_loop().call_soon(self.on_exit, self)

    def reply(self, **msg):
        self._deliver(msg)


def workers_config(n=1, **kw):
    c = WorkersConfig(mode="inline", devices=["cpu"] * n)
    for k, v in kw.items():
        setattr(c, k, v)
    c.validate()
    return c


def scripted_pool(n=1, **kw):
    log = []
    pool = LocalWorkerPool(workers_config(n, **kw), Metrics(), policy=("patience", 2.0),
                           make_worker=lambda i, d, on_message, on_exit: Scripted(i, d, on_message, on_exit, log))
    return pool, log


def counted(pool, event):
    return pool.metrics.registry.get_sample_value("e3_worker_events_total", {"event": event}) or 0


async def until(predicate, seconds=5.0):
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not hold in time")


# -- calls ---------------------------------------------------------------------

async def test_calls_of_every_kind_are_matched_to_their_replies_by_call_id():
    """Two calls of one kind and epoch to one real (inline) engine, one failing: each caller gets
    its own reply, at once (matching by kind or epoch let one wait out its timeout or take the other's)."""
    model = MLPModel()
    pool = LocalWorkerPool(workers_config(), Metrics(), model=LoadedModel(model, make_policy("patience", 2), Path(".")),
                           policy=("patience", 2.0))
    events = Recorder()
    await pool.start(events)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ok, bad = await asyncio.gather(
            pool.call(0, Kind.PREPARE, 5.0, epoch=7, batch=2, rings=[], splits=[[0, 1]]),
            pool.call(0, Kind.PREPARE, 5.0, epoch=7, batch=2, rings=[], splits=[[0, 99]]),
            return_exceptions=True)
        assert loop.time() - started < 2.0
        assert isinstance(ok, dict) and ok["k"] == Kind.READY and ok["epoch"] == 7, ok
        assert isinstance(bad, WorkerFailedError) and "worker 0 failed PREPARE" in str(bad), bad
        assert pool.pending_calls == 0 and events.replies == []     # calls never reach the data plane
    finally:
        await pool.stop()


async def test_a_reply_or_death_of_another_worker_object_never_settles_a_call():
    """A replacement has its predecessor's id: the old one's late reply carrying the same call
    id, or its death, must not answer the new one's call."""
    calls, log = Calls(), []
    old, new = (Scripted(0, "cpu", None, None, log) for _ in range(2))
    old.alive = new.alive = True
    asked = asyncio.ensure_future(calls.ask(new, Kind.PROFILE, 5.0, args={}))
    await asyncio.sleep(0)
    [(kind, fields)] = new.sent
    calls.answer(old, {"k": Kind.PROFILED, "call": fields["call"], "profile": "stale"})
    calls.fail_all_of(old)
    await asyncio.sleep(0.01)
    assert not asked.done()
    calls.answer(new, {"k": Kind.PROFILED, "call": fields["call"], "profile": "mine"})
    assert (await asked)["profile"] == "mine" and len(calls) == 0


async def test_a_call_without_a_reply_times_out_with_an_error():
    pool, _ = scripted_pool()
    await pool.start(Recorder())
    try:
        with pytest.raises(WorkerFailedError, match="did not answer PROFILE within 0 s"):
            await pool.call(0, Kind.PROFILE, 0.05, args={})
        assert pool.pending_calls == 0
    finally:
        await pool.stop()


async def test_messages_without_a_call_id_go_to_the_data_plane():
    pool, _ = scripted_pool()
    events = Recorder()
    await pool.start(events)
    try:
        w = pool.workers[0]
        w.reply(k=Kind.DONE, id=3, epoch=0)
        assert events.replies == [(w, {"k": Kind.DONE, "id": 3, "epoch": 0})]
    finally:
        await pool.stop()


# -- deaths and restarts -------------------------------------------------------

async def test_a_dead_worker_fails_its_calls_is_reported_and_replaced_after_a_failed_join():
    pool, log = scripted_pool(2)
    events = Recorder(join_failures=1)
    await pool.start(events)
    try:
        dead, other = pool.workers[0], pool.workers[1]
        pending = asyncio.ensure_future(pool.call(0, Kind.PREPARE, 30.0, epoch=0, batch=1, rings=[], splits=[]))
        other_call = asyncio.ensure_future(pool.call(1, Kind.PREPARE, 30.0, epoch=0, batch=1, rings=[], splits=[]))
        await asyncio.sleep(0)
        pool.set_policy("maxprob", 0.5)
        dead.die()
        with pytest.raises(WorkerFailedError, match="worker 0 died before answering PREPARE"):
            await asyncio.wait_for(pending, 1.0)
        assert not other_call.done(), "a death fails that worker's calls only"
        await until(lambda: events.restarted)
        assert events.lost == [dead]
        first, second = events.joined                      # the first replacement failed its join
        assert ("stop", first) in log and not first.alive
        assert events.restarted == [second] and pool.workers[0] is second and second.alive
        assert second is not dead and second.worker_id == 0
        # The replacement hears the node's current policy before anything else.
        assert second.sent[0] == (Kind.POLICY, {"name": "maxprob", "threshold": 0.5})
        assert pool.workers[1] is other and counted(pool, "died") == 1 and counted(pool, "restarted") == 1
        other_call.cancel()
    finally:
        await pool.stop()


async def test_no_restart_when_restarts_are_off_or_the_pool_drains():
    pool, _ = scripted_pool(2, restart=False)
    events = Recorder()
    await pool.start(events)
    try:
        pool.workers[0].die()
        await until(lambda: events.lost)
        await pool.drain()
        await asyncio.sleep(0.05)
        assert events.joined == [] and not pool.workers[0].alive
    finally:
        await pool.stop()
    pool, _ = scripted_pool(1)
    events = Recorder()
    await pool.start(events)
    try:
        await pool.drain()
        pool.workers[0].die()
        await until(lambda: events.lost)
        await asyncio.sleep(0.05)
        assert events.joined == []
    finally:
        await pool.stop()


# -- the watchdog --------------------------------------------------------------

async def test_the_watchdog_kills_a_worker_process_that_holds_a_batch_too_long_once():
    pool, _ = scripted_pool(2, batch_timeout_s=0.4, hedge_floor_s=0.1)
    events = Recorder()
    await pool.start(events)
    try:
        hung, fine = pool.workers[0], pool.workers[1]
        now = asyncio.get_running_loop().time()
        events.held = [HeldBatch(hung, 5, 0, now - 1.0), HeldBatch(fine, 6, 0, now)]
        await until(lambda: events.lost, 3.0)
        assert hung.killed and events.lost == [hung] and not fine.killed
        assert counted(pool, "hung") == 1
        events.held = []
    finally:
        await pool.stop()


# -- stop ----------------------------------------------------------------------

async def test_stop_cancels_a_restart_in_progress_and_stops_every_worker(monkeypatch):
    """A replacement still starting when the pool stops is stopped too, never left running."""
    pool, log = scripted_pool(2)
    events = Recorder()
    await pool.start(events)
    dead = pool.workers[0]

    async def slow_start(self):          # a worker process loads its model for seconds
        await asyncio.sleep(30)
    monkeypatch.setattr(Scripted, "start", slow_start)
    dead.die()
    await until(lambda: events.lost)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(pool.stop(), 2.0)
    replacement = [w for kind, w in log if kind == "stop" and w is not dead and w is not pool.workers[1]]
    assert len(replacement) == 1, log                   # stopped although it never finished starting
    assert ("stop", pool.workers[1]) in log and events.joined == []
    assert pool._watchdog is None


# -- the worker socket: HELLO by call id -----------------------------------------

async def test_each_start_gets_the_process_that_echoes_its_call_id():
    """Two starts of worker 0 (a restart while an earlier start's process still connects): each
    HELLO settles the start whose call id it echoes; one with an unknown call id is turned away."""
    server = WorkerServer()
    await server.start()
    try:
        (call_a, fut_a), (call_b, fut_b) = server.expect(), server.expect()
        assert call_a != call_b

        async def hello(call, pid):
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(pack(Kind.HELLO, call=call, worker=0, pid=pid, device="cpu"))
            await writer.drain()
            return reader, writer
        conns = [await hello(call_b, 222), await hello(call_a, 111), await hello(call_a + 99, 333)]
        (hello_a, _, node_a), (hello_b, _, node_b) = await asyncio.wait_for(asyncio.gather(fut_a, fut_b), 2.0)
        assert (hello_a["pid"], hello_b["pid"]) == (111, 222)
        stray_reader = conns[2][0]
        assert await asyncio.wait_for(read_frame(stray_reader), 2.0) is None    # closed on it
        for writer in [node_a, node_b] + [w for _, w in conns]:
            writer.close()
    finally:
        await server.close()
    assert not os.path.exists(server.path)


async def test_a_cancelled_call_stays_cancelled_when_its_reply_arrives_in_the_same_turn():
    """Python 3.11's wait_for returned the reply and dropped the cancel when both came in one turn
    of the loop: the task that was told to stop went on (a node's shutdown waited on it forever)."""
    calls = Calls()
    worker = Scripted(0, "cpu", None, None, [])
    worker.alive = True
    asked = asyncio.ensure_future(calls.ask(worker, Kind.PROFILE, 5.0, args={}))
    await asyncio.sleep(0)
    [(_, fields)] = worker.sent
    calls.answer(worker, {"k": Kind.PROFILED, "call": fields["call"], "profile": "late"})
    asked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asked
    assert len(calls) == 0
