"""The worker's compute engine: one plain loop's worth of logic, no asyncio.

`WorkerEngine.handle(msg)` takes one node message and returns the reply. The
same engine runs inside a worker process (worker.py, fed from a socket) or
in the node's process on a thread (InlineWorker), so both modes execute the
exact same code; tests cover both.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from e3.models.base import EarlyExitModel
from e3.models.executor import Split, SplitExecutor, state_spec_entering
from e3.models.policies import ExitPolicy, make_policy
from e3.models.state import BatchState

from .cuda_ring import CudaSlotRing, collect_released
from .slots import RingSpec, SlotRing, gather
from .wire import Kind

log = logging.getLogger(__name__)


class WorkerEngine:
    """Runs splits of one model on one device for the node."""

    def __init__(self, model: EarlyExitModel, policy: ExitPolicy, device: str = "cpu",
                 attach: Callable[[RingSpec], SlotRing] = SlotRing.attach,
                 clock: Callable[[], float] = time.perf_counter):
        self.model, self.policy, self.device = model, policy, torch.device(device)
        self._attach, self._clock = attach, clock
        self._rings: dict[str, SlotRing | CudaSlotRing] = {}
        self._executors: dict[tuple[int, int], SplitExecutor] = {}
        self._warmed: set[tuple[int, int, int]] = set()     # (first, last, rows) warmed here
        self._handlers = {Kind.PREPARE: self._prepare, Kind.RUN: self._run,
                          Kind.RETIRE: self._retire, Kind.POLICY: self._set_policy,
                          Kind.PROFILE: self._profile, Kind.ALLOC_RING: self._alloc_rings}

    def handle(self, msg: dict) -> dict | None:
        """The reply to `msg` (a dict with "k"), or None when none is due; a reply to a
        call echoes its `call` id (wire.py)."""
        try:
            reply = self._handlers[msg["k"]](msg)
        except Exception as exc:  # a bad batch must not kill the worker
            log.exception("worker failed on %s", msg["k"].name)
            reply = {"k": Kind.FAILED, "id": msg.get("id"), "epoch": msg.get("epoch"),
                     "error": f"{type(exc).__name__}: {exc}"}
        if reply is not None and msg.get("call") is not None:
            reply["call"] = msg["call"]
        return reply

    def close(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()

    # -- messages ---------------------------------------------------------

    def _prepare(self, msg: dict) -> dict:
        """Map the epoch's rings and warm every split it will run at its batch size."""
        start = self._clock()
        for d in msg["rings"]:
            if d["id"] not in self._rings:     # a CUDA ring this worker allocated is already here
                self._rings[d["id"]] = self._map(RingSpec.from_wire(d))
        for first, last in msg["splits"]:
            self._warm(self._executor(first, last), msg["batch"])
        return {"k": Kind.READY, "epoch": msg["epoch"], "warm_s": self._clock() - start}

    def _warm(self, ex: SplitExecutor, batch: int) -> None:
        """Run a split once on dummy rows, the first time this worker meets it (at this batch size
        on a GPU, whose kernels and allocator blocks depend on the shape).

        A worker warms while the running epoch waits for it: on a CPU two full batches of every
        split cost MiniLM about 210 ms per hot swap at batch 16 (by its profile), and every request
        in flight then missed a 100 ms SLO.
        A CPU needs no more than one pass at one row (first-call paths); a split run before, none."""
        gpu = self.device.type == "cuda"
        key = (ex.split.first, ex.split.last, batch if gpu else 1)
        if key in self._warmed:
            return
        spec = state_spec_entering(self.model.meta, self.policy, ex.split.first)
        state = BatchState.empty(spec, batch if gpu else 1, self.device)
        if "mask" in state:  # an all-padding text batch would attend to nothing
            state = state.replace(mask=torch.ones_like(state["mask"]))
        for _ in range(2 if gpu else 1):
            ex(state)
        self._warmed.add(key)

    def _alloc_rings(self, msg: dict) -> dict:
        """Allocate the epoch's CUDA rings this worker owns; reply with their IPC handles."""
        collect_released()            # rings of retired epochs whose openers have let go since
        specs = []
        for d in msg["rings"]:
            spec = RingSpec.from_wire(d["ring"])
            ring = self._rings.get(spec.ring_id)
            if ring is None:
                ring = CudaSlotRing.allocate(spec, self.device, owner=msg["owner"], share=bool(d["share"]))
                self._rings[spec.ring_id] = ring
            specs.append(ring.spec.to_wire())
        return {"k": Kind.RING_ALLOCATED, "epoch": msg["epoch"], "rings": specs}

    def _run(self, msg: dict) -> dict:
        start = self._clock()
        ex = self._executor(*msg["split"])
        state = gather([(self._rings[r], s, a, n) for r, s, a, n in msg["src"]], self.device)
        out = ex(state, observe_inner=bool(msg.get("observe")))
        if msg.get("dst") is not None and out.state.rows:
            ring, slot = msg["dst"]
            # Each ring copies from the state's device: host memory for a
            # shared-memory ring, the ring's GPU for a CUDA ring (which also
            # records the slot's event, see cuda_ring.py).
            self._rings[ring].write(slot, 0, out.state)
        # The .tolist() / .cpu() below wait for this batch's compute on the
        # worker's stream: DONE leaves only after that.
        return {"k": Kind.DONE, "id": msg["id"], "epoch": msg["epoch"], "exit": out.exit_point,
                "exited": out.exited.tolist(), "survivors": out.survivors.tolist(),
                "logits": out.logits.float().cpu().numpy().tobytes(),
                "observed": out.observed, "compute_s": self._clock() - start}

    def _retire(self, msg: dict) -> None:
        for ring_id in msg["rings"]:
            ring = self._rings.pop(ring_id, None)
            if ring is not None:
                ring.close()
        return None

    def _map(self, spec: RingSpec) -> SlotRing | CudaSlotRing:
        """Open a ring another process created: by IPC handle for a CUDA ring, by path otherwise."""
        if spec.cuda is None:
            return self._attach(spec)
        return CudaSlotRing.open(spec, self.device)

    def _set_policy(self, msg: dict) -> None:
        if msg["name"] == self.policy.name:
            self.policy.set_threshold(msg["threshold"])
        else:
            self.policy = make_policy(msg["name"], msg["threshold"])
            self._executors.clear()
            self._warmed.clear()            # the new policy's executors are new code paths
        return None

    def _profile(self, msg: dict) -> dict:
        from e3.planner.profiler import profile_model
        return {"k": Kind.PROFILED, "profile": profile_model(self.model, self.policy, **msg["args"]).to_json()}

    # -- helpers ----------------------------------------------------------

    def _executor(self, first: int, last: int) -> SplitExecutor:
        key = (first, last)
        if key not in self._executors:
            self._executors[key] = SplitExecutor(self.model, self.policy, Split(first, last))
        return self._executors[key]

