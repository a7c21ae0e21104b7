"""Typed messages between the node and its workers: msgpack frames, tagged by kind.

Only small messages travel here (slot numbers, row positions, a few logits);
boundary tensors stay in slot rings (shared memory, slots.py; GPU memory,
cuda_ring.py, whose IPC handles travel once, as bytes). Nothing is ever
pickled: a frame is a 4-byte big-endian length and a msgpack map whose "k"
field is a `Kind`.

Request/reply: a node message that waits for an answer (PREPARE, ALLOC_RING,
PROFILE) carries a `call` id, unique per node, and the worker echoes it in the
reply (READY, RING_ALLOCATED, PROFILED, or FAILED), which is how the node
matches a reply to its request whatever the kind. RUN is matched by its batch
`id` instead: its DONE / FAILED echo that. A worker process's HELLO echoes the
call id of the start that spawned it (its `--call` argument).
"""
from __future__ import annotations

import asyncio
import enum
import socket
import struct

import msgpack

from .errors import WireError

MAX_FRAME = 16 * 1024 * 1024
_LEN = struct.Struct(">I")


class Kind(enum.IntEnum):
    HELLO = 1      # worker -> node: model loaded {call, worker, pid, device} (call: its start's id)
    PREPARE = 2    # node -> worker: {call, epoch, batch, rings: [ring], splits: [[first, last]]}
    READY = 3      # worker -> node: {call, epoch, warm_s}
    RUN = 4        # node -> worker: {id, split, src: [[ring, slot, start, count]], dst, observe}
    DONE = 5       # worker -> node: {id, exit, exited, logits, survivors, observed, compute_s}
    RETIRE = 6     # node -> worker: {rings: [ring id]} detach from retired rings
    POLICY = 7     # node -> worker: {name, threshold}
    FAILED = 8     # worker -> node: {id, call, epoch, error} a batch (id) or a call failed
    STOP = 9       # node -> worker: finish and exit
    PROFILE = 10   # node -> worker: {call, args} measure per-block latency
    PROFILED = 11  # worker -> node: {call, profile}
    ALLOC_RING = 12      # node -> worker: {call, epoch, owner, rings: [{ring, share}]} allocate CUDA rings
    RING_ALLOCATED = 13  # worker -> node: {call, epoch, rings: [ring with its "cuda" IPC handles]}


def pack(kind: Kind, **fields) -> bytes:
    body = msgpack.packb({"k": int(kind), **fields}, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def unpack(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
        msg["k"] = Kind(msg["k"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise WireError(f"malformed frame: {exc}") from None
    return msg


async def read_frame(reader: asyncio.StreamReader) -> dict | None:
    """The next message, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise WireError("stream ended inside a frame header") from None
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise WireError(f"peer announced a frame of {size} bytes (limit {MAX_FRAME})")
    try:
        return unpack(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise WireError("stream ended inside a frame") from None


class BlockingChannel:
    """The worker's side: a plain blocking socket (the worker's loop is not asyncio)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, kind: Kind, **fields) -> None:
        self.sock.sendall(pack(kind, **fields))

    def recv(self) -> dict | None:
        head = self._exactly(_LEN.size)
        if head is None:
            return None
        (size,) = _LEN.unpack(head)
        if size > MAX_FRAME:
            raise WireError(f"peer announced a frame of {size} bytes (limit {MAX_FRAME})")
        body = self._exactly(size)
        if body is None:
            raise WireError("stream ended inside a frame")
        return unpack(body)

    def _exactly(self, n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(n - got)
            if not chunk:
                if got:
                    raise WireError("stream ended inside a frame")
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
