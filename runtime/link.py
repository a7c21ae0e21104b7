"""A link: one persistent WebSocket between two nodes of a cluster, carrying typed frames.

A frame is one binary WebSocket message:

    [4-byte big-endian header length][msgpack header][raw tensor bytes ...]

The header is a map with the frame's `k` (a `LinkKind`), its fields, and
`t`: one [dtype, shape] per tensor whose bytes follow it, in order, out of
band (never pickled, never inside msgpack). Frames larger than the link's
`max_frame_bytes` are refused on both sides: the sender raises WireError, the
receiver closes the link (aiohttp refuses a larger WebSocket message before
it is read whole).

Credits bound what a receiver holds. A frame sent as `data` (a batch's rows,
a batch's outputs) takes one of the credits the peer granted; the receiver
gives each back (`grant`) when it no longer holds what the frame brought (the
member: when its worker has run the batch). Without a credit, data frames
wait in the sender's queue, bounded by `max_pending`: beyond it `send`
raises LinkFullError, so a slow receiver back-pressures its sender and
nothing buffers without end. A peer that sends more data frames than it was
granted breaks the protocol and the link closes.

Frames keep their order, but for control frames (credits, heartbeats,
pings) which go ahead of queued data so that two peers each out of credits
never wait for each other.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import logging
import struct
from typing import Callable, Sequence

import msgpack
import torch
from aiohttp import WSMsgType

from .errors import RuntimeError_, WireError

log = logging.getLogger(__name__)
_LEN = struct.Struct(">I")
_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


class LinkKind(enum.IntEnum):
    JOIN = 1          # member -> coordinator: {host, devices, free_memory, credits}
    JOINED = 2        # coordinator -> member: {member, proof, lease_s, heartbeat_s, credits, policy, model}
    READY = 3         # member -> coordinator: {workers: [{id, device, threads}]} its workers are warm
    HEARTBEAT = 4     # member -> coordinator: {free_memory}
    PING = 5          # coordinator -> member: {seq} + a payload tensor (link latency and bandwidth)
    PONG = 6          # member -> coordinator: {seq} + the same payload
    TO_WORKER = 7     # coordinator -> member: {w: worker, m: worker message} + a RUN's rows
    FROM_WORKER = 8   # member -> coordinator: {w, m} + a DONE's survivors
    WORKER_LOST = 9   # member -> coordinator: {w} one of its workers died (its pool restarts it)
    WORKER_BACK = 10  # member -> coordinator: {w} the replacement is up
    POLICY = 11       # coordinator -> member: {name, threshold}
    CREDIT = 12       # either way: {} (the credits ride in every frame's "cr")
    BYE = 13          # either way: {reason} the sender closes the link


# Sent ahead of queued data frames: they free the peer or say the sender is alive.
CONTROL = frozenset({LinkKind.CREDIT, LinkKind.HEARTBEAT, LinkKind.PING, LinkKind.PONG, LinkKind.BYE})


class LinkFullError(RuntimeError_):
    """Raised when a link's queue of data frames waiting for credits is full."""

    status = 503
    retry_after_s = 1


class LinkClosedError(RuntimeError_):
    """Raised when a frame is sent on a closed link."""

    status = 503
    retry_after_s = 1


def encode_frame(kind: LinkKind, tensors: Sequence[torch.Tensor] = (), max_bytes: int | None = None,
                 **fields) -> bytes:
    """One frame's bytes; WireError when it would exceed `max_bytes`."""
    blobs, meta = [], []
    for t in tensors:
        t = t.detach().cpu().contiguous()
        meta.append([str(t.dtype).replace("torch.", ""), list(t.shape)])
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    header = msgpack.packb({"k": int(kind), **fields, "t": meta}, use_bin_type=True)
    size = _LEN.size + len(header) + sum(map(len, blobs))
    if max_bytes is not None and size > max_bytes:
        raise WireError(f"a {kind.name} frame of {size} bytes exceeds the link's limit of {max_bytes}")
    return b"".join([_LEN.pack(len(header)), header, *blobs])


def decode_frame(data: bytes | bytearray, max_bytes: int | None = None) -> tuple[dict, list[torch.Tensor]]:
    """The header (its `k` a LinkKind) and tensors of one frame; WireError for a malformed or
    oversized one. The tensors are views of one writable copy of the frame's bytes."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"a frame of {len(data)} bytes exceeds the link's limit of {max_bytes}")
    if len(data) < _LEN.size:
        raise WireError("a frame shorter than its header length")
    (hlen,) = _LEN.unpack_from(data)
    if _LEN.size + hlen > len(data):
        raise WireError(f"a frame announces a {hlen}-byte header in {len(data)} bytes")
    try:
        header = msgpack.unpackb(bytes(data[_LEN.size:_LEN.size + hlen]), raw=False, strict_map_key=False)
        header["k"] = LinkKind(header["k"])
        meta = header.pop("t")
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise WireError(f"malformed frame header: {exc}") from None
    buf = bytearray(data) if isinstance(data, bytes) else data
    offset, tensors = _LEN.size + hlen, []
    try:
        for dtype_name, shape in meta:
            dtype = _DTYPES[dtype_name]
            n = dtype.itemsize
            for d in shape:
                n *= int(d)
            if n < 0 or offset + n > len(buf):
                raise WireError(f"a frame's tensors need more bytes than its {len(buf)}")
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=offset) if n else \
                torch.empty(0, dtype=torch.uint8)
            tensors.append(raw.view(dtype).reshape([int(d) for d in shape]))
            offset += n
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WireError(f"malformed frame tensors: {exc}") from None
    if offset != len(buf):
        raise WireError(f"a frame carries {len(buf) - offset} bytes its header does not describe")
    return header, tensors


OnFrame = Callable[[dict, list], None]


class Link:
    """Frames over one WebSocket (aiohttp's client or server side), with credits.

    Lifecycle: make it on an open socket, `start(on_frame)` (a reader and a
    writer task), then `close()`; `closed` resolves when the link ends either way."""

    def __init__(self, ws, *, name: str, max_frame_bytes: int, recv_credits: int, send_credits: int = 0,
                 max_pending: int = 256):
        """`recv_credits`: data frames this side takes in flight (announced to the peer in the
        handshake); `send_credits`: what the peer announced (set_send_credits once known)."""
        self.ws, self.name = ws, name
        self.max_frame_bytes, self.recv_credits, self.max_pending = max_frame_bytes, recv_credits, max_pending
        self._credits = send_credits
        self._data: collections.deque[tuple[bytes, bool]] = collections.deque()   # (frame, data) in order
        self._control: collections.deque[bytes] = collections.deque()
        self._owed = 0                  # credits to give back with the next frame
        self._held = 0                  # data frames received and not granted back yet
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sent_frames = self.received_frames = 0
        self.goodbye: str | None = None   # the peer's reason, when it ended the link by saying goodbye

    # -- sending -----------------------------------------------------------

    @property
    def credits(self) -> int:
        return self._credits

    @property
    def pending(self) -> int:
        return len(self._data)

    def set_send_credits(self, n: int) -> None:
        self._credits = n
        self._wake.set()

    def send(self, kind: LinkKind, tensors: Sequence[torch.Tensor] = (), *, data: bool = False, **fields) -> None:
        """Queue a frame (never blocks); `data`: it takes a credit. LinkClosedError on a closed
        link, LinkFullError when max_pending data frames wait already, WireError when too large."""
        if self.closed.done():
            raise LinkClosedError(f"link {self.name} is closed")
        frame = (kind, tensors, {**fields, "data": True} if data else fields)
        if kind in CONTROL:
            self._control.append(self._encode(*frame))
        else:
            if len(self._data) >= self.max_pending:
                raise LinkFullError(f"link {self.name}: {len(self._data)} frames wait for the peer's credits")
            self._data.append((self._encode(*frame), data))
        self._wake.set()

    def _encode(self, kind: LinkKind, tensors, fields) -> bytes:
        # Credits owed ride in the frame (its encoding happens now: a queued frame's "cr" is
        # given back when it was queued, which is when the receiver let go of what it held).
        owed, self._owed = self._owed, 0
        return encode_frame(kind, tensors, self.max_frame_bytes, cr=owed, **fields)

    def grant(self, n: int = 1) -> None:
        """This side let go of what `n` data frames brought: give their credits back."""
        n = min(n, self._held)
        if n <= 0:
            return
        self._held -= n
        self._owed += n
        # Coalesced: a frame sent in this loop iteration carries them; else one CREDIT frame does.
        asyncio.get_running_loop().call_soon(self._flush_credits)

    def _flush_credits(self) -> None:
        if self._owed and not self.closed.done():
            self.send(LinkKind.CREDIT)

    async def _write(self) -> None:
        while True:
            while self._control or (self._data and (not self._data[0][1] or self._credits > 0)):
                if self._control:
                    frame = self._control.popleft()
                else:
                    frame, data = self._data.popleft()
                    self._credits -= data
                await self.ws.send_bytes(frame)
                self.sent_frames += 1
            self._wake.clear()
            await self._wake.wait()

    # -- receiving ---------------------------------------------------------

    async def _read(self, on_frame: OnFrame) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                header, tensors = decode_frame(msg.data, self.max_frame_bytes)
                self.received_frames += 1
                cr = header.pop("cr", 0)
                if not isinstance(cr, int) or cr < 0:
                    raise WireError(f"a frame gives back {cr!r} credits")
                if cr:
                    self.set_send_credits(self._credits + cr)
                if header.get("data"):          # kept in the header: the handler grants it back
                    self._held += 1
                    if self._held > self.recv_credits:
                        raise WireError(f"the peer sent {self._held} data frames on {self.recv_credits} credits")
                if header["k"] == LinkKind.BYE:
                    self.goodbye = str(header.get("reason") or "no reason given")
                    log.info("link %s: the peer says goodbye: %s", self.name, self.goodbye)
                    return
                if header["k"] != LinkKind.CREDIT:
                    on_frame(header, tensors)
            elif msg.type == WSMsgType.ERROR:
                raise WireError(f"the WebSocket failed: {self.ws.exception()}")
            elif msg.type == WSMsgType.TEXT:
                raise WireError("a text message on a link (frames are binary)")
            else:
                return

    def start(self, on_frame: OnFrame) -> None:
        """Read frames into `on_frame(header, tensors)` (on the loop) and write what is queued."""
        self._tasks = [asyncio.create_task(self._run(self._read, on_frame), name=f"e3-link-{self.name}-read"),
                       asyncio.create_task(self._run(self._write), name=f"e3-link-{self.name}-write")]

    async def run_until_closed(self, on_frame: OnFrame) -> None:
        """start() and wait for the link to end (the server side keeps its handler until then)."""
        self.start(on_frame)
        await asyncio.shield(self.closed)

    async def _run(self, step, *args) -> None:
        reason = "the peer closed the link"
        try:
            await step(*args)     # made here: a task cancelled before it starts leaves no coroutine behind
            if self.goodbye is not None:
                reason = f"it said goodbye ({self.goodbye})"
        except asyncio.CancelledError:
            raise
        except (WireError, ConnectionError, RuntimeError) as exc:
            reason = str(exc)
            log.warning("link %s: %s", self.name, exc)
        except Exception as exc:     # a handler's bug ends this link, not the node
            reason = f"{type(exc).__name__}: {exc}"
            log.exception("link %s failed", self.name)
        await self._end(reason)

    async def _end(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if not self.ws.closed:
            await self.ws.close()

    async def close(self, reason: str = "closing") -> None:
        """Say goodbye (best effort) and end the link."""
        if not self.closed.done() and not self.ws.closed:
            try:
                await self.ws.send_bytes(encode_frame(LinkKind.BYE, reason=reason))
            except (ConnectionError, RuntimeError):
                pass
        await self._end(reason)
        await asyncio.gather(*self._tasks, return_exceptions=True)
