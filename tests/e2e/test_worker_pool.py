"""The worker pool on real worker processes: calls, a SIGKILLed worker, stop order.

A `Recorder` (tests/runtime/test_worker_pool.py) stands where the data plane
is; the workers are real `e3.runtime.worker_process` children on the digits
model, reached over the pool's Unix socket.
"""
import asyncio
import os
import signal

import pytest

from e3.models.registry import load_model
from e3.runtime.config import WorkersConfig
from e3.runtime.errors import WorkerFailedError
from e3.runtime.metrics import Metrics
from e3.runtime.wire import Kind
from e3.runtime.worker_client import WorkerServer
from e3.runtime.worker_pool import LocalWorkerPool
from tests.runtime.test_worker_pool import Recorder, until
from tests.support.procs import live_processes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def worker_children() -> list[int]:
    return [p for p, parent, _, cmd in live_processes()
            if parent == os.getpid() and b"e3.runtime.worker_process" in cmd]


def process_pool(model_dir, workers=1) -> tuple[LocalWorkerPool, object]:
    config = WorkersConfig(mode="process", cpu_workers=workers, threads_per_worker=1, devices=["cpu"] * workers)
    config.validate()
    loaded = load_model(model_dir)
    return LocalWorkerPool(config, Metrics(), model=loaded, policy=("entropy", 0.3)), loaded.model.meta


def prepare(meta, epoch):
    return dict(epoch=epoch, batch=2, rings=[], splits=[[0, meta.num_blocks - 1]])


async def test_a_killed_worker_process_fails_its_call_is_replaced_and_workers_stop_before_the_socket(
        default_dir, monkeypatch):
    pool, meta = process_pool(default_dir)
    events = Recorder()
    closed_with = []
    close = WorkerServer.close

    async def recording_close(server):
        closed_with.append(([w.proc.returncode for w in pool.workers.values()], os.path.exists(server.path)))
        await close(server)
    monkeypatch.setattr(WorkerServer, "close", recording_close)
    await pool.start(events)
    socket_dir = os.path.dirname(pool._server.path)
    try:
        first = pool.workers[0]
        assert first.pid != os.getpid() and first.pid in worker_children()
        assert (await pool.call(0, Kind.PREPARE, 60.0, **prepare(meta, 0)))["k"] == Kind.READY
        os.kill(first.pid, signal.SIGSTOP)            # it cannot answer what it is asked next
        pending = asyncio.ensure_future(pool.call(0, Kind.PREPARE, 60.0, **prepare(meta, 1)))
        await asyncio.sleep(0.1)
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(WorkerFailedError, match="worker 0 died before answering PREPARE"):
            await asyncio.wait_for(pending, 10.0)
        await until(lambda: events.restarted, 60.0)
        second = pool.workers[0]
        assert events.lost == [first] and events.restarted == [second] and second.pid != first.pid
        reply = await pool.call(0, Kind.PREPARE, 60.0, **prepare(meta, 2))
        assert reply["k"] == Kind.READY and reply["epoch"] == 2
        assert pool.pending_calls == 0
    finally:
        await pool.stop()
    [(returncodes, socket_there)] = closed_with
    assert all(rc is not None for rc in returncodes) and socket_there, "workers stop before their socket"
    assert not os.path.exists(socket_dir) and worker_children() == []


async def test_stopping_while_a_replacement_process_starts_leaves_no_process(default_dir):
    pool, _ = process_pool(default_dir)
    events = Recorder()
    await pool.start(events)
    try:
        victim = pool.workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        await until(lambda: events.lost, 10.0)
        await until(lambda: len(worker_children()) == 1, 10.0)     # the replacement is loading its model
    finally:
        await asyncio.wait_for(pool.stop(), 30.0)
    assert worker_children() == []
