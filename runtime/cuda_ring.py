"""Slot rings in GPU memory, shared between worker processes through CUDA IPC.

When every worker that writes or reads a split boundary is a GPU worker
process on this host, the boundary's ring lives in GPU memory, so survivors
never pass through host memory. The node keeps the slot accounting exactly as
for a shared-memory ring (SlotPool); only the memory moves.

Lifecycle (the node never initialises CUDA):
- The node plans the ring (NodeCudaRing: a spec and an owner, no memory) and
  asks one worker that writes the boundary to allocate it (Kind.ALLOC_RING).
- That worker allocates one flat byte buffer on its device and one
  interprocess event per slot (CudaSlotRing.allocate) and answers with their
  IPC handles (Kind.RING_ALLOCATED): bytes and ints in msgpack, never pickled.
- Every other worker that reads or writes the boundary opens the handles once,
  at PREPARE (CudaSlotRing.open).
- RETIRE: openers drop their mapping, the owner drops its storage; torch
  frees the memory once the owner and every opener have let go (close()).

Order between processes: the writer copies survivors into a slot on the
current stream of the ring's device and records the slot's event there; the
reader makes that stream wait on the event before it reads. The worker sends
DONE only after the exit decisions and logits are copied to host, which
already orders a same-device write before the node can dispatch the reader;
the event keeps the order correct when the ring sits on another device than
the writer's compute, or if that host copy ever becomes asynchronous. The
other way round, a reader's copy out of a slot finishes before its own DONE
(the same host copy waits for it), so the node frees a slot for rewriting
only after every read of it.

Torch APIs used, private ones checked against the torch 2.x source:
- UntypedStorage._share_cuda_() -> (device, handle, size bytes, offset bytes,
  ref counter handle, ref counter offset, event handle, event sync required):
  torch/csrc/StorageSharing.cpp THPStorage_shareCuda; used the same way by
  reduce_tensor in torch/multiprocessing/reductions.py.
- UntypedStorage._new_shared_cuda(*that tuple), after torch.cuda._lazy_init():
  THPStorage_newSharedCuda (bytes handles, int sizes, a real bool last), as in
  rebuild_cuda_tensor in torch/multiprocessing/reductions.py.
- torch.cuda.Event(interprocess=True), Event.ipc_handle() (creates the event
  on the current device if not yet recorded), Event.from_ipc_handle(device,
  handle): torch/cuda/streams.py, torch/csrc/cuda/Event.cpp; the same pair as
  reduce_event / rebuild_event in reductions.py.
- Stream.wait_event, Event.record(stream): torch/cuda/streams.py.
- torch.cuda.ipc_collect(): frees shared storages whose openers all released
  them (CudaIPCSentDataLimbo in torch/csrc/CudaIPCTypes.cpp).
"""
from __future__ import annotations

from typing import Sequence

import torch

from e3.models.state import BatchState, StateSpec

from .slots import CudaIpc, RingSpec, field_views


def cuda_ring_applies(devices: Sequence[str], separate_processes: bool) -> bool:
    """Whether a boundary whose writers and readers run on `devices` gets a CUDA ring.

    Only when every one of them is a CUDA device and each worker is its own
    process: cudaIpcOpenMemHandle maps memory exported by *another* process,
    and inline workers share the node's process (which must not touch CUDA).
    All workers of a node are on its host, so "this host" holds.
    """
    return bool(devices) and separate_processes and all(torch.device(d).type == "cuda" for d in devices)


def _device_index(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"a CUDA ring needs a CUDA worker, but this worker runs on {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


class CudaSlotRing:
    """A ring in GPU memory as a worker holds it: the allocating worker's, or one opened by handle."""

    def __init__(self, spec: RingSpec, storage: torch.UntypedStorage, events: list, owner: bool):
        self.spec, self.owner = spec, owner
        self.device = torch.device("cuda", spec.cuda.device)
        self._storage, self._events = storage, events
        raw = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage, 0, (spec.nbytes,), (1,))
        self._views = field_views(raw, spec)

    @classmethod
    def allocate(cls, spec: RingSpec, device: torch.device | str, owner: int, share: bool) -> "CudaSlotRing":
        """Allocate `spec`'s ring on `device`; with `share`, export IPC handles into the returned spec."""
        if spec.cuda is not None:
            raise ValueError(f"ring {spec.ring_id} is already allocated (on cuda:{spec.cuda.device})")
        index = _device_index(device)
        with torch.cuda.device(index):
            storage = torch.zeros(spec.nbytes, dtype=torch.uint8, device=f"cuda:{index}").untyped_storage()
            events = [torch.cuda.Event(interprocess=True) for _ in range(spec.slots)]
            # Export only when another process will open the ring: torch keeps a
            # shared storage in its "limbo" until an opener has released it, so a
            # ring exported but never opened would never be freed.
            handles = (tuple(storage._share_cuda_()), tuple(e.ipc_handle() for e in events)) if share else (None, ())
        ipc = CudaIpc(index, owner, *handles)
        return cls(RingSpec(spec.ring_id, "", spec.slots, spec.capacity, spec.fields, ipc), storage, events, True)

    @classmethod
    def open(cls, spec: RingSpec, device: torch.device | str) -> "CudaSlotRing":
        """Map a ring another worker allocated (once per process, at PREPARE)."""
        _device_index(device)         # a clear error on a CPU worker, before CUDA is touched
        ipc = spec.cuda
        if ipc is None:
            raise ValueError(f"ring {spec.ring_id} is not a CUDA ring")
        if ipc.storage is None:
            raise ValueError(f"ring {spec.ring_id} was allocated by worker {ipc.owner} for its own use only "
                             f"(no IPC handle); no other process can open it")
        if len(ipc.events) != spec.slots:
            raise ValueError(f"ring {spec.ring_id} has {spec.slots} slots but {len(ipc.events)} event handles")
        torch.cuda._lazy_init()       # as rebuild_cuda_tensor does before _new_shared_cuda
        storage = torch.UntypedStorage._new_shared_cuda(*ipc.storage)
        if storage.nbytes() < spec.nbytes:
            raise ValueError(f"ring {spec.ring_id}: the shared storage has {storage.nbytes()} bytes, "
                             f"the spec needs {spec.nbytes}")
        # A torch.device, as reductions.rebuild_event passes (the event's .device).
        events = [torch.cuda.Event.from_ipc_handle(torch.device("cuda", ipc.device), h) for h in ipc.events]
        return cls(spec, storage, events, False)

    def write(self, slot: int, start: int, state: BatchState) -> None:
        """Copy the rows of `state` (on any device) into rows start.. of `slot`, then record the slot's event."""
        stream = torch.cuda.current_stream(self.device)
        for name, view in self._views.items():
            # A copy from another device is ordered against this device's current
            # stream by torch's cross-device copy, so recording there covers it.
            view[slot, start:start + state.rows].copy_(state[name])
        self._events[slot].record(stream)

    def read(self, slot: int, start: int, count: int) -> BatchState:
        """Views (no copy) of rows start..start+count of `slot`, ordered after the slot's last write.

        Kernels that read these views run on the ring device's current stream
        (torch picks the stream of the tensors' device), which waits here.
        """
        torch.cuda.current_stream(self.device).wait_event(self._events[slot])
        return BatchState({n: v[slot, start:start + count] for n, v in self._views.items()})

    def close(self) -> None:
        """Drop this process's storage, views and events.

        An opener's storage deleter syncs its stream and decrements torch's
        shared ref counter; the owner's storage is freed at once if every
        opener has released it, else parked by torch until ipc_collect().
        """
        exported = self.owner and self.spec.cuda.storage is not None
        self._views, self._events, self._storage = {}, [], None
        if exported:
            collect_released()


def collect_released() -> None:
    """Free exported ring storages that every opener has released (a no-op without CUDA state)."""
    if torch.cuda.is_initialized():
        torch.cuda.ipc_collect()


class NodeCudaRing:
    """The node's side of a CUDA ring: its spec and owner, for slot accounting only.

    It holds no memory and never touches CUDA; the spec gains its `cuda` entry
    (IPC handles) when the owner's RING_ALLOCATED reply arrives.
    """

    def __init__(self, spec: RingSpec, owner: int, participants: frozenset[int]):
        self.spec, self.owner_id, self.participants = spec, owner, participants

    @classmethod
    def plan(cls, state_spec: StateSpec, slots: int, capacity: int, ring_id: str, owner: int,
             participants: Sequence[int]) -> "NodeCudaRing":
        return cls(RingSpec(ring_id, "", slots, capacity, state_spec.fields), owner, frozenset(participants))

    @property
    def share(self) -> bool:
        """Whether any worker but the owner opens it (then the owner exports IPC handles)."""
        return bool(self.participants - {self.owner_id})

    @property
    def allocated(self) -> bool:
        return self.spec.cuda is not None

    def set_allocated(self, spec: RingSpec) -> None:
        """Take the owner's reply: the same ring, now with its `cuda` entry."""
        if spec.ring_id != self.spec.ring_id or spec.cuda is None:
            raise ValueError(f"worker {self.owner_id} answered for ring {spec.ring_id} "
                             f"{'without' if spec.cuda is None else 'with'} handles; expected {self.spec.ring_id}")
        if (spec.slots, spec.capacity, spec.fields) != (self.spec.slots, self.spec.capacity, self.spec.fields):
            raise ValueError(f"worker {self.owner_id} allocated ring {spec.ring_id} with another layout")
        if self.share and spec.cuda.storage is None:
            raise ValueError(f"worker {self.owner_id} allocated shared ring {spec.ring_id} without IPC handles")
        self.spec = spec

    def write(self, slot: int, start: int, state: BatchState) -> None:
        raise RuntimeError(f"ring {self.spec.ring_id} is in GPU memory of worker {self.owner_id}; "
                           f"the node cannot write it")

    def read(self, slot: int, start: int, count: int) -> BatchState:
        raise RuntimeError(f"ring {self.spec.ring_id} is in GPU memory of worker {self.owner_id}; "
                           f"the node cannot read it")

    def close(self) -> None:
        """Nothing to free here: the workers free the memory when RETIRE reaches them."""
