"""Driving a GenerationEngine from asyncio: the engine loops on its own thread, fed by a queue.

The event loop never computes: `generate()` puts the request on the engine's
inbox and reads its tokens from a per-request asyncio queue that the engine
thread fills through `call_soon_threadsafe`. Admission happens on the event
loop against a count of held sequences, so a refusal (EngineFullError) is
immediate; a consumer that stops reading (a client that disconnected) aborts
its request and the engine frees its KV slot at the next step boundary.
`drain()` waits until every admitted request has ended (the node's Ctrl-C).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import torch

from .llm_engine import (EngineFullError, FinishedEvent, GenerationEngine, GenerationRequest,
                         TokenEvent)

_STOP = object()


class EngineClient:
    """start() / generate() / close(): one engine thread behind an asyncio interface."""

    def __init__(self, engine: GenerationEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[int, asyncio.Queue] = {}
        self._held = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None     # set while no request is held
        self.error: BaseException | None = None

    @property
    def held(self) -> int:
        """Sequences admitted and not yet finished (their KV slots are taken or about to be)."""
        return self._held

    @property
    def running(self) -> bool:
        """The engine thread is up and has not failed."""
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="e3-llm-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop the engine thread after its current step; open streams end with an error."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        for stream in self._streams.values():
            stream.put_nowait(RuntimeError("the generation engine closed"))

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no admitted request is left, at most `timeout_s`; True if none is left."""
        if self._idle is None:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
            return True
        except asyncio.TimeoutError:
            return False

    def generate(self, req: GenerationRequest) -> "TokenStream":
        """A stream of the request's tokens as they are made. Raises GenerationRequestError or
        EngineFullError at once when the request cannot be admitted. Iterate the stream to its
        end or `aclose()` it (`async with` does): closing early aborts the request."""
        self.engine.check(req)
        if self._thread is None:
            raise RuntimeError("the engine client is not started")
        if self.error is not None:
            raise RuntimeError(f"the generation engine failed: {self.error!r}")
        if self._held >= self.engine.pool.slots:
            raise EngineFullError(f"all {self.engine.pool.slots} KV slots are in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[req.id] = stream
        self._held += 1
        self._idle.clear()
        self._inbox.put(("add", req))
        return TokenStream(self, req.id, stream)

    def _abort(self, rid: int) -> None:
        self._inbox.put(("abort", rid))

    def _release(self, rid: int) -> None:
        """The engine has freed the request's slot (it finished, failed or was aborted)."""
        if self._streams.pop(rid, None) is not None:
            self._held -= 1
            if self._held == 0:
                self._idle.set()

    # ---- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        if self.engine.config.threads:
            torch.set_num_threads(self.engine.config.threads)
        try:
            while self._take(block=not self.engine.busy):
                events = self.engine.step()
                if events:
                    self._loop.call_soon_threadsafe(self._deliver, events)
        except BaseException as exc:          # surfaced to every open stream, never lost
            self.error = exc
            self._loop.call_soon_threadsafe(self._fail, exc)

    def _take(self, block: bool) -> bool:
        """Apply what the event loop sent; False once asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            kind, arg = item
            if kind == "add":
                self._admit(arg)
            else:
                self.engine.abort(arg)

    def _admit(self, req: GenerationRequest) -> None:
        try:
            self.engine.add(req)
        except (EngineFullError, ValueError) as exc:   # check() ran before: reported, never lost
            self._loop.call_soon_threadsafe(self._deliver, [(req.id, exc)])

    def _deliver(self, events) -> None:
        """On the event loop: hand each event to its stream; the last one of a request frees it."""
        for ev in events:
            rid, ev = ev if isinstance(ev, tuple) else (ev.request_id, ev)
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(ev)
            if not isinstance(ev, TokenEvent) or ev.finish is not None:
                self._release(rid)

    def _fail(self, exc: BaseException) -> None:
        for rid in list(self._streams):
            self._deliver([(rid, RuntimeError(f"the generation engine failed: {exc!r}"))])


class TokenStream:
    """The tokens of one request; `aclose()` before the end aborts it and frees its KV slot.
    Once iteration ends, `finish` says why: "length", "stop", "deadline" (the engine did not make
    the next token in time) or "abort"."""

    def __init__(self, client: EngineClient, rid: int, queue_: asyncio.Queue):
        self._client, self.request_id, self._queue = client, rid, queue_
        self._done = False
        self.finish: str | None = None

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        ev = await self._queue.get()
        if isinstance(ev, BaseException):
            self._done = True
            raise ev
        if isinstance(ev, FinishedEvent):
            self._done, self.finish = True, ev.finish
            raise StopAsyncIteration
        self._done, self.finish = ev.finish is not None, ev.finish
        return ev

    async def aclose(self) -> None:
        if not self._done:
            self._done, self.finish = True, "abort"
            self._client._abort(self.request_id)

    async def __aenter__(self) -> "TokenStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
