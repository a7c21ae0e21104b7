"""Preallocated shared-memory slot rings: how boundary tensors cross processes.

A ring holds `slots` slots of `capacity` rows for every field of a state spec
(hidden tensor, mask, policy counters). The node creates the ring (a file in
/dev/shm mapped with torch.from_file(shared=True)); workers map the same file
by path, once. Per batch only (ring, slot, start, count) travels in a message.

Why files rather than multiprocessing.shared_memory: on Python 3.11 every
attach registers the segment with a per-process resource tracker, which
unlinks it as "leaked" when a worker exits, destroying the node's buffers.

Slot ownership is the node's (SlotPool): a producer's slot stays held until
every consumer of its rows has acknowledged, then returns to the free list.

A boundary whose producers and consumers are all GPU worker processes uses a
ring in GPU memory instead (cuda_ring.py); its spec then carries a `cuda`
entry (CudaIpc) and no file path. The admission ring, written by the node
from CPU, is always a shared-memory ring.
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from e3.models.state import BatchState, FieldSpec, StateSpec

log = logging.getLogger(__name__)
_ALIGN = 64
_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int8, torch.uint8, torch.bool)}


def _shm_root() -> Path:
    root = Path("/dev/shm")
    return root if root.is_dir() and os.access(root, os.W_OK) else Path(tempfile.gettempdir())


_RING_FILE = re.compile(r"e3-(\d+)-")
_swept = False       # sweep_stale_rings runs once per process, before its first ring


def sweep_stale_rings(root: Path | None = None) -> int:
    """Delete ring files whose creator is gone; returns how many.

    Only SlotRing.close() removes a ring's file, so a node killed with SIGKILL
    (or crashed) leaves its rings in shared memory, i.e. in RAM, for good. The
    file name carries the creator's pid: `e3-<pid>-*` of a pid that no longer
    runs is garbage. A live pid's files are never touched."""
    root = _shm_root() if root is None else root
    removed = 0
    for path in root.glob("e3-*"):
        m = _RING_FILE.match(path.name)
        if m is None or pid_alive(int(m.group(1))) or not path.is_file():
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:     # another node swept it first
            pass
    if removed:
        log.info("removed %d ring file(s) in %s left by processes that no longer run", removed, root)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (or may: another user's process, or an odd answer, counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's live process; anything else: keep
        return True
    return True


def boundary_slots(batch: int, reach: list[float], replicas: list[int], max_inflight: int,
                   base: int) -> tuple[int, ...]:
    """Slots per split's input ring so that its rebatcher can gather a full batch.

    Survivors stay in the slot their upstream batch wrote, one slot per upstream batch,
    until every row of it has run. Where a fraction c of a split's rows go on, a full
    batch of B needs rows from min(B, ceil(1/c)) slots; more are held by the batches in
    flight on each side. `reach[i]`: fraction of inputs entering split i (forecast);
    `replicas[i]`: workers of split i. Ring 0 (admission) keeps `base`; at most 4 x base."""
    out = [base]
    for i in range(1, len(reach)):
        carried = reach[i] / reach[i - 1] if reach[i - 1] > 0 else 1.0
        per_batch = min(batch, math.ceil(1 / max(carried, 1e-6)))
        need = per_batch * (1 + replicas[i] * max_inflight) + replicas[i - 1] * max_inflight + 1
        out.append(min(max(base, need), 4 * base))
    return tuple(out)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class CudaIpc:
    """Where a CUDA ring lives and how another process opens it (msgpack-safe: bytes, ints, a bool).

    `storage` is the 8-tuple that torch's UntypedStorage._share_cuda_() returns
    (device, handle, size bytes, offset bytes, ref counter handle, ref counter
    offset, event handle, event sync required), passed back verbatim to
    UntypedStorage._new_shared_cuda(); None when no other process may open the
    ring (its only reader and writer is the allocating worker). `events` holds
    one interprocess event handle per slot (torch.cuda.Event.ipc_handle()).
    """

    device: int                       # CUDA device index of the ring's memory
    owner: int                        # worker id that allocated it (and frees it)
    storage: tuple | None = None
    events: tuple[bytes, ...] = ()

    def to_wire(self) -> dict:
        return {"device": self.device, "owner": self.owner,
                "storage": None if self.storage is None else list(self.storage), "events": list(self.events)}

    @staticmethod
    def from_wire(d: dict) -> "CudaIpc":
        storage = d.get("storage")
        if storage is not None and len(storage) != 8:
            raise ValueError(f"a CUDA storage handle has 8 fields (torch's _share_cuda_ tuple), got {len(storage)}")
        return CudaIpc(int(d["device"]), int(d["owner"]), None if storage is None else tuple(storage),
                       tuple(d.get("events", ())))


@dataclass(frozen=True)
class RingSpec:
    """What a process needs to map a ring: sent once, in a PREPARE message."""

    ring_id: str
    path: str                         # the shared-memory file; "" for a CUDA ring
    slots: int
    capacity: int
    fields: tuple[FieldSpec, ...]
    cuda: CudaIpc | None = None       # set for a ring in GPU memory (cuda_ring.py)

    def layout(self) -> list[tuple[FieldSpec, int, int]]:
        """(field, byte offset, byte size) of each field's region."""
        out, off = [], 0
        for f in self.fields:
            size = self.slots * self.capacity * f.bytes_per_sample
            out.append((f, off, size))
            off = _aligned(off + size)
        return out

    @property
    def nbytes(self) -> int:
        lay = self.layout()
        return max(_aligned(off + size) for _, off, size in lay) if lay else _ALIGN

    def to_wire(self) -> dict:
        d = {"id": self.ring_id, "path": self.path, "slots": self.slots, "capacity": self.capacity,
             "fields": [[f.name, list(f.shape), str(f.dtype).replace("torch.", "")] for f in self.fields]}
        if self.cuda is not None:     # absent, not null, for shared memory: the CPU wire form is unchanged
            d["cuda"] = self.cuda.to_wire()
        return d

    @staticmethod
    def from_wire(d: dict) -> "RingSpec":
        fields = tuple(FieldSpec(n, tuple(s), _DTYPES[t]) for n, s, t in d["fields"])
        cuda = CudaIpc.from_wire(d["cuda"]) if d.get("cuda") is not None else None
        return RingSpec(d["id"], d["path"], d["slots"], d["capacity"], fields, cuda)


def field_views(raw: torch.Tensor, spec: RingSpec) -> dict[str, torch.Tensor]:
    """Typed [slots, capacity, *shape] views of each field's region of the flat byte buffer `raw`."""
    return {f.name: raw[off:off + size].view(f.dtype).view(spec.slots, spec.capacity, *f.shape)
            for f, off, size in spec.layout()}


class SlotRing:
    """A mapped ring: typed views per field, row copies in and out of slots."""

    def __init__(self, spec: RingSpec, owner: bool):
        self.spec, self.owner = spec, owner
        raw = torch.from_file(spec.path, shared=True, size=spec.nbytes, dtype=torch.uint8)
        self._views = field_views(raw, spec)

    @classmethod
    def create(cls, state_spec: StateSpec, slots: int, capacity: int, tag: str = "ring") -> "SlotRing":
        global _swept
        if not _swept:
            _swept = True
            sweep_stale_rings()
        ring_id = f"{tag}-{uuid.uuid4().hex[:12]}"
        path = str(_shm_root() / f"e3-{os.getpid()}-{ring_id}")
        spec = RingSpec(ring_id, path, slots, capacity, state_spec.fields)
        with open(path, "wb") as fh:
            fh.truncate(spec.nbytes)
        return cls(spec, owner=True)

    @classmethod
    def attach(cls, spec: RingSpec) -> "SlotRing":
        return cls(spec, owner=False)

    def write(self, slot: int, start: int, state: BatchState) -> None:
        """Copy the rows of `state` (on any device) into rows start.. of `slot`."""
        for name, view in self._views.items():
            view[slot, start:start + state.rows].copy_(state[name])

    def read(self, slot: int, start: int, count: int) -> BatchState:
        """Views (no copy) of rows start..start+count of `slot`."""
        return BatchState({n: v[slot, start:start + count] for n, v in self._views.items()})

    def close(self) -> None:
        """Drop this process's mapping; the owner also removes the file."""
        self._views = {}
        if self.owner:
            try:
                os.unlink(self.spec.path)
            except FileNotFoundError:
                pass


def gather(segments: Sequence[tuple[SlotRing, int, int, int]], device: torch.device | str = "cpu") -> BatchState:
    """One contiguous batch (a copy) from row segments of one or more slots.

    This is the rebatch: survivors of several upstream batches become one batch.
    """
    parts = [ring.read(slot, start, count) for ring, slot, start, count in segments]
    # concat copies; a single segment must be cloned, or the batch would alias the slot.
    state = BatchState.concat(parts) if len(parts) > 1 else \
        BatchState({n: t.clone() for n, t in parts[0].items()})
    return state if torch.device(device).type == "cpu" else state.to(device)


class SlotPool:
    """The node's accounting of one ring: free slots and reference counts."""

    def __init__(self, ring: SlotRing):
        self.ring = ring
        self._free = list(range(ring.spec.slots - 1, -1, -1))
        self._refs = [0] * ring.spec.slots

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.ring.spec.slots - len(self._free)

    def acquire(self) -> int | None:
        """A free slot, reserved (one reference), or None when the ring is full."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._refs[slot] = 1
        return slot

    def hold(self, slot: int, n: int = 1) -> None:
        """Add `n` references (one per row that still needs the slot)."""
        if self._refs[slot] <= 0:
            raise ValueError(f"hold on free slot {slot} of ring {self.ring.spec.ring_id}")
        self._refs[slot] += n

    def release(self, slot: int, n: int = 1) -> None:
        """Drop `n` references; the slot is free again at zero."""
        if self._refs[slot] < n:
            raise ValueError(f"release of {n} on slot {slot} of ring {self.ring.spec.ring_id} "
                             f"holding {self._refs[slot]}")
        self._refs[slot] -= n
        if self._refs[slot] == 0:
            self._free.append(slot)
