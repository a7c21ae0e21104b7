"""The node's handle on a worker: one interface, two ways to run the engine.

- `ProcessWorker`: a real subprocess per device, talking msgpack frames over a
  Unix socket; its death is noticed (end of stream / exit code) and reported.
- `InlineWorker`: the same WorkerEngine in the node's process, on one
  dedicated thread so that compute never blocks the event loop.

Both call `on_message(worker, msg)` for each reply and `on_exit(worker)` once
when the worker is gone, and both count messages in flight (load balancing).
The worker pool (worker_pool.py) makes them and takes both callbacks.
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import itertools
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .engine import WorkerEngine
from .errors import NotReadyError
from .slots import pid_alive
from .wire import Kind, pack, read_frame

log = logging.getLogger(__name__)

OnMessage = Callable[["WorkerClient", dict], None]
OnExit = Callable[["WorkerClient"], None]


class WorkerClient(abc.ABC):
    """A worker as the node sees it."""

    # Whether the engine runs in a process of its own: a CUDA ring can only be
    # shared between distinct processes (pipeline.py, cuda_ring.py).
    own_process = False

    def __init__(self, worker_id: int, device: str, on_message: OnMessage, on_exit: OnExit):
        self.worker_id, self.device = worker_id, device
        self.on_message, self.on_exit = on_message, on_exit
        self.inflight = 0
        self.alive = False
        # Held a batch past its hedge time (pipeline.py): gets no new batch until it answers.
        self.suspect = False
        self.killed = False       # kill() was called: its death is on the way

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the worker and wait until its model is loaded."""

    @abc.abstractmethod
    def send(self, kind: Kind, **fields) -> None:
        """Queue a message to the worker (never blocks)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Ask the worker to finish and wait for it."""

    def _deliver(self, msg: dict) -> None:
        try:
            self.on_message(self, msg)
        except Exception:  # a bug in a handler must not silence the worker
            log.exception("handling %s from worker %d failed", msg.get("k"), self.worker_id)


class InlineWorker(WorkerClient):
    """The engine in this process, on its own thread."""

    def __init__(self, worker_id: int, engine: WorkerEngine, on_message: OnMessage, on_exit: OnExit):
        super().__init__(worker_id, str(engine.device), on_message, on_exit)
        self.engine = engine
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"e3-inline-{worker_id}")

    async def start(self) -> None:
        self.alive = True

    def send(self, kind: Kind, **fields) -> None:
        if not self.alive:
            raise NotReadyError(f"worker {self.worker_id} is stopped")
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self.engine.handle, {"k": kind, **fields})
        fut.add_done_callback(self._replied)

    def _replied(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.result() is not None:
            self._deliver(fut.result())

    async def stop(self) -> None:
        self.alive = False
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        self.engine.close()


_SOCKET_DIR = re.compile(r"e3-node-(\d+)-")


def sweep_stale_socket_dirs(root: Path | None = None) -> int:
    """Remove the socket directories of nodes that no longer run; returns how many.

    close() removes a node's directory; a node killed with SIGKILL cannot. The name
    carries the node's pid (`e3-node-<pid>-*`): a directory of a live pid is never touched."""
    root = Path(tempfile.gettempdir()) if root is None else root
    removed = 0
    for path in root.glob("e3-node-*"):
        m = _SOCKET_DIR.match(path.name)
        if m is None or pid_alive(int(m.group(1))) or not path.is_dir():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += not path.exists()
    if removed:
        log.info("removed %d socket director%s in %s left by nodes that no longer run",
                 removed, "y" if removed == 1 else "ies", root)
    return removed


class WorkerServer:
    """The node's Unix socket that worker processes connect back to, in a directory of its
    own named after the node's pid (so that the next node sweeps it if this one is killed)."""

    def __init__(self):
        sweep_stale_socket_dirs()
        self._dir = tempfile.TemporaryDirectory(prefix=f"e3-node-{os.getpid()}-")
        self.path = os.path.join(self._dir.name, "workers.sock")
        # Starts waiting for their worker's HELLO, by the call id the process was given and
        # echoes: two starts of one worker id (a restart while a timed-out start's process
        # still connects) each get their own process.
        self._waiting: dict[int, asyncio.Future] = {}
        self._calls = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=self.path)

    def expect(self) -> tuple[int, asyncio.Future]:
        """A call id to start a worker process with, and the future its HELLO settles."""
        call, fut = next(self._calls), asyncio.get_running_loop().create_future()
        self._waiting[call] = fut
        fut.add_done_callback(lambda _: self._waiting.pop(call, None))   # a start given up, too
        return call, fut

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_frame(reader)
        except Exception as exc:
            log.warning("a worker connection sent a bad greeting: %s", exc)
            writer.close()
            return
        fut = self._waiting.pop(hello.get("call"), None) if hello and hello["k"] == Kind.HELLO else None
        if fut is None or fut.done():
            writer.close()
            return
        fut.set_result((hello, reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._dir.cleanup()


def worker_env(threads: int, workers: int, wait_policy: str = "auto") -> dict[str, str]:
    """The environment of a CPU worker process: the node's, with OpenMP's wait policy chosen
    (workers.omp_wait_policy) unless the environment already sets one."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" in env or threads < 2:
        return env
    if wait_policy == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        wait_policy = "passive" if threads * workers >= cores else "active"
    env["OMP_WAIT_POLICY"] = wait_policy.upper()
    return env


class ProcessWorker(WorkerClient):
    """A worker subprocess on one device."""

    own_process = True

    def __init__(self, worker_id: int, device: str, server: WorkerServer, model_dir: str,
                 policy: tuple[str, float], threads: int, on_message: OnMessage, on_exit: OnExit,
                 start_timeout_s: float = 120.0, env: dict[str, str] | None = None):
        super().__init__(worker_id, device, on_message, on_exit)
        self._server, self._model_dir, self._policy, self._threads = server, model_dir, policy, threads
        self.env = env                  # None: the node's own environment
        self._start_timeout_s = start_timeout_s
        self.proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self.pid: int | None = None

    async def start(self) -> None:
        call, hello_fut = self._server.expect()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "e3.runtime.worker_process", "--connect", self._server.path,
            "--call", str(call), "--worker", str(self.worker_id), "--model", self._model_dir, "--device", self.device,
            "--threads", str(self._threads), "--policy", self._policy[0],
            "--threshold", repr(self._policy[1]), "--node-pid", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL, env=self.env)
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait({hello_fut, exited}, timeout=self._start_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # A start cut short (Ctrl-C while the node starts): stop() sees no live worker,
            # so kill it here, or it outlives the node and fails to connect with a traceback.
            hello_fut.cancel()
            exited.cancel()
            await self._kill()
            raise
        if hello_fut not in done:
            hello_fut.cancel()
            exited.cancel()
            await self._kill()
            why = f"exited with code {self.proc.returncode}" if exited in done else "timed out"
            raise NotReadyError(f"worker {self.worker_id} on {self.device} failed to start ({why})")
        exited.cancel()
        hello, reader, self._writer = hello_fut.result()
        self.pid, self.alive = hello["pid"], True
        self._reader_task = asyncio.create_task(self._read(reader), name=f"e3-worker-{self.worker_id}")

    def send(self, kind: Kind, **fields) -> None:
        if not self.alive or self._writer is None:
            raise NotReadyError(f"worker {self.worker_id} is not running")
        self._writer.write(pack(kind, **fields))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (msg := await read_frame(reader)) is not None:
                self._deliver(msg)
        except Exception as exc:
            log.error("worker %d: connection broke: %s", self.worker_id, exc)
        finally:
            was_alive, self.alive = self.alive, False
            if self._writer is not None:
                self._writer.close()    # a dead worker's socket; its replacement gets a new one
            if was_alive:
                await self._reap()
                self.on_exit(self)

    async def _reap(self) -> None:
        try:
            async with asyncio.timeout(5):
                await self.proc.wait()
        except asyncio.TimeoutError:
            await self._kill()

    async def _kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.kill()
            await self.proc.wait()

    async def stop(self) -> None:
        if self.alive:
            self.alive = False
            try:
                self._writer.write(pack(Kind.STOP))
                await self._writer.drain()
            except ConnectionError:
                pass
            await self._reap()
        else:
            await self._kill()    # a process that never said hello (its start failed or was cancelled)
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)

    def kill(self) -> None:
        """Kill the process outright (fault injection and last-resort shutdown)."""
        self.killed = True
        if self.proc and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:    # it exited, and its exit status is not read yet
                pass
