"""CUDA IPC slot rings: wire form, ring selection, the node's allocation protocol, and (on a GPU) the rings.

The first part runs anywhere: the RingSpec `cuda` entry through msgpack, which
boundaries get a CUDA ring, and the node's side of allocating, preparing,
discarding and losing CUDA rings, driven by a scripted worker (no CUDA in the
node, by design). The second part needs a CUDA device and is skipped without
one: real rings shared between spawned processes, event ordering, freeing,
and a node with GPU worker processes.
"""
import asyncio
import contextlib
import multiprocessing as mp
from pathlib import Path

import msgpack
import pytest
import torch

from e3.models.policies import make_policy
from e3.models.registry import LoadedModel
from e3.models.state import BatchState, FieldSpec, StateSpec
from e3.runtime.config import E3Config
from e3.runtime.cuda_ring import NodeCudaRing, cuda_ring_applies
from e3.runtime.engine import WorkerEngine
from e3.runtime.errors import WorkerFailedError
from e3.runtime.metrics import Metrics
from e3.runtime.pipeline import Pipeline, Placement
from e3.runtime.runtime import Runtime
from e3.runtime.slots import CudaIpc, RingSpec, SlotRing
from e3.runtime.wire import Kind, pack, unpack
from e3.runtime.worker_client import WorkerClient
from e3.runtime.worker_pool import LocalWorkerPool
from tests.support.mlp import MLPModel

SPEC = StateSpec((FieldSpec("hidden", (4, 6), torch.float32), FieldSpec("mask", (4,), torch.int64)))


def needs_cuda(test):
    """The project's `gpu` marker, and a skip where no CUDA device is present."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


# The shape of UntypedStorage._share_cuda_()'s tuple (torch/csrc/StorageSharing.cpp):
# device, handle, size bytes, offset bytes, ref counter handle, ref counter offset,
# event handle, event sync required. Values here are made up: only the wire is tested.
FAKE_STORAGE = (0, b"\x01\x02" * 33, 4096, 512, b"/torch_123_456", 7, bytes(range(64)), True)


def _through_wire(d: dict) -> dict:
    return unpack(pack(Kind.PREPARE, rings=[d])[4:])["rings"][0]


# -- wire form ---------------------------------------------------------------

def test_shared_memory_spec_wire_form_is_unchanged_and_round_trips():
    ring = SlotRing.create(SPEC, slots=3, capacity=5, tag="wire")
    try:
        d = ring.spec.to_wire()
        assert "cuda" not in d
        assert RingSpec.from_wire(_through_wire(d)) == ring.spec
    finally:
        ring.close()


def test_cuda_spec_round_trips_through_msgpack_keeping_bytes_ints_and_bool():
    ipc = CudaIpc(device=1, owner=3, storage=FAKE_STORAGE, events=(b"\xaa" * 64, b"\xbb" * 64))
    spec = RingSpec("e0s1-abc", "", 2, 5, SPEC.fields, ipc)
    back = RingSpec.from_wire(_through_wire(spec.to_wire()))
    assert back == spec
    # _new_shared_cuda checks these types exactly (PyBytes_Check, PyBool_Check).
    assert [type(v) for v in back.cuda.storage] == [int, bytes, int, int, bytes, int, bytes, bool]
    assert all(type(e) is bytes for e in back.cuda.events)


def test_cuda_spec_of_a_ring_kept_private_has_no_handles():
    spec = RingSpec("e0s1-abc", "", 2, 5, SPEC.fields, CudaIpc(device=0, owner=0))
    d = _through_wire(spec.to_wire())
    assert d["cuda"]["storage"] is None and d["cuda"]["events"] == []
    assert RingSpec.from_wire(d) == spec


def test_a_malformed_storage_handle_is_refused():
    d = RingSpec("r", "", 2, 5, SPEC.fields, CudaIpc(0, 0, FAKE_STORAGE[:5])).to_wire()
    with pytest.raises(ValueError, match="8 fields"):
        RingSpec.from_wire(d)


# -- selection ---------------------------------------------------------------

@pytest.mark.parametrize("devices,processes,expected", [
    (["cuda:0", "cuda:1"], True, True),
    (["cuda:0", "cuda:0"], True, True),
    (["cuda"], True, True),
    (["cuda:0", "cpu"], True, False),
    (["cpu", "cpu"], True, False),
    (["cuda:0", "cuda:1"], False, False),     # inline workers share the node's process
    ([], True, False),
])
def test_cuda_ring_only_when_every_participant_is_a_gpu_worker_process(devices, processes, expected):
    assert cuda_ring_applies(devices, processes) is expected


class ScriptedWorker(WorkerClient):
    """A worker as the node sees it, answering setup messages from a script (no engine, no CUDA).

    It stands in for a GPU worker process so that the node's half of the
    protocol can be checked on a machine without a GPU.
    """

    own_process = True

    def __init__(self, worker_id, device, on_message=None, on_exit=None, fail_alloc=False):
        super().__init__(worker_id, device, on_message, on_exit)
        self.sent, self.alive, self.fail_alloc = [], True, fail_alloc

    async def start(self):
        self.alive = True

    async def stop(self):
        self.alive = False

    def send(self, kind, **fields):
        self.sent.append((kind, fields))
        reply = self._reply(kind, fields)
        if reply is not None:
            reply["call"] = fields.get("call")      # as WorkerEngine.handle echoes it
            asyncio.get_running_loop().call_soon(self._deliver, reply)

    def _reply(self, kind, fields):
        if kind == Kind.ALLOC_RING and self.fail_alloc:
            return {"k": Kind.FAILED, "id": None, "epoch": fields["epoch"], "error": "out of memory"}
        if kind == Kind.ALLOC_RING:
            rings = []
            for d in fields["rings"]:
                spec = RingSpec.from_wire(d["ring"])
                ipc = CudaIpc(0, fields["owner"], FAKE_STORAGE if d["share"] else None,
                              (b"\x00" * 64,) * spec.slots if d["share"] else ())
                rings.append(RingSpec(spec.ring_id, "", spec.slots, spec.capacity, spec.fields, ipc).to_wire())
            return {"k": Kind.RING_ALLOCATED, "epoch": fields["epoch"], "rings": rings}
        if kind == Kind.PREPARE:
            return {"k": Kind.READY, "epoch": fields["epoch"], "warm_s": 0.0}
        return None

    def kinds(self):
        return [k for k, _ in self.sent]


SPLITS = ((0, 1), (2, 3), (4, 5))     # MLPModel: 6 blocks, a ramp after each of 0..4


def pipeline_on(devices, workers, own_process=True):
    ws = {i: ScriptedWorker(i, d) for i, d in enumerate(devices)}
    for w in ws.values():
        w.own_process = own_process
    model = MLPModel()
    return Pipeline(0, model.meta, make_policy("patience", 2), Placement(4, SPLITS, workers), ws,
                    admission_rows=64, slots_per_ring=4, sample_fraction=0.0, max_inflight=2, max_attempts=2,
                    on_answer=lambda s, r: None)


def test_pipeline_puts_only_all_gpu_boundaries_in_gpu_memory():
    p = pipeline_on(["cuda:0", "cuda:1", "cpu"], ((0,), (1,), (2,)))
    try:
        admission, gpu_boundary, mixed_boundary = (pool.ring for pool in p.pools)
        assert isinstance(admission, SlotRing) and isinstance(mixed_boundary, SlotRing)
        assert isinstance(gpu_boundary, NodeCudaRing)
        assert gpu_boundary.owner_id == 0 and gpu_boundary.participants == {0, 1} and gpu_boundary.share
        assert [r.spec.ring_id for r in p.cuda_rings()] == [gpu_boundary.spec.ring_id]
        # A worker is sent only the CUDA rings it writes or reads.
        assert gpu_boundary.spec.ring_id in [d["id"] for d in p.ring_specs(1)]
        assert gpu_boundary.spec.ring_id not in [d["id"] for d in p.ring_specs(2)]
        assert len(p.ring_ids()) == 3
        with pytest.raises(RuntimeError, match="GPU memory of worker 0"):
            gpu_boundary.write(0, 0, BatchState.empty(SPEC, 1))
    finally:
        p.close()


def test_inline_gpu_workers_keep_shared_memory_rings():
    p = pipeline_on(["cuda:0", "cuda:1"], ((0,), (1,), (0, 1)), own_process=False)
    try:
        assert all(isinstance(pool.ring, SlotRing) for pool in p.pools)
        assert p.cuda_rings() == []
    finally:
        p.close()


def test_a_ring_used_by_its_owner_alone_is_not_exported():
    p = pipeline_on(["cuda:0", "cuda:1"], ((0,), (0,), (1,)))
    try:
        private, shared = p.cuda_rings()
        assert (private.owner_id, private.share) == (0, False)
        assert (shared.owner_id, shared.share) == (0, True)
    finally:
        p.close()


def test_the_owner_is_a_live_writer():
    devices = ["cuda:0", "cuda:1", "cuda:2"]
    ws = {i: ScriptedWorker(i, d) for i, d in enumerate(devices)}
    ws[0].alive = False
    model = MLPModel()
    p = Pipeline(0, model.meta, make_policy("patience", 2), Placement(4, SPLITS, ((0, 1), (2,), (2,))), ws,
                 admission_rows=64, slots_per_ring=4, sample_fraction=0.0, max_inflight=2, max_attempts=2,
                 on_answer=lambda s, r: None)
    try:
        assert [r.owner_id for r in p.cuda_rings()] == [1, 2]
    finally:
        p.close()


# -- the node's protocol -------------------------------------------------------

async def gpu_runtime(devices, fail_alloc=()):
    """A runtime whose pool holds scripted workers (no engine), started but given no plan yet."""
    c = E3Config()
    c.model.path = "digits"
    c.workers.mode, c.workers.devices = "inline", list(devices)
    c.batching.slo_ms, c.batching.timeout_ms = 500, 30000
    metrics = Metrics()

    def scripted(worker_id, device, on_message, on_exit):
        return ScriptedWorker(worker_id, device, on_message, on_exit, fail_alloc=worker_id in fail_alloc)
    pool = LocalWorkerPool(c.workers, metrics, policy=("patience", 2), make_worker=scripted)
    rt = Runtime(c, model=LoadedModel(MLPModel(), make_policy("patience", 2), Path(".")), metrics=metrics, pool=pool)
    await pool.start(rt)
    return rt


async def test_the_owner_allocates_before_any_worker_prepares_and_handles_reach_participants_only():
    rt = await gpu_runtime(["cuda:0", "cuda:1", "cuda:0"])
    try:
        epoch = await rt.apply(Placement(4, SPLITS, ((0,), (1,), (1,))))
        ring = rt.pipelines[epoch].pools[1].ring
        assert isinstance(ring, NodeCudaRing) and ring.allocated
        assert ring.spec.cuda.storage == FAKE_STORAGE and ring.spec.cuda.owner == 0
        w0, w1, w2 = rt.workers.values()
        # Ring 1 (split 0 on worker 0 -> split 1 on worker 1) is shared; ring 2 stays on worker 1.
        assert w0.kinds() == w1.kinds() == [Kind.ALLOC_RING, Kind.PREPARE] and w2.kinds() == [Kind.PREPARE]
        allocs = {w.worker_id: w.sent[0][1] for w in (w0, w1)}
        assert [(a["owner"], [d["share"] for d in a["rings"]]) for a in allocs.values()] == [(0, [True]), (1, [False])]
        assert allocs[0]["rings"][0]["ring"]["id"] == ring.spec.ring_id
        assert "cuda" not in allocs[0]["rings"][0]["ring"]
        prepared = {w.worker_id: {d["id"]: d for d in w.sent[-1][1]["rings"]} for w in (w0, w1, w2)}
        assert prepared[1][ring.spec.ring_id]["cuda"]["storage"] == list(FAKE_STORAGE)
        assert ring.spec.ring_id not in prepared[2]
    finally:
        await rt.close()


async def test_a_failed_allocation_fails_the_swap_and_frees_what_was_allocated():
    rt = await gpu_runtime(["cuda:0", "cuda:1", "cuda:2"], fail_alloc={1})
    try:
        with pytest.raises(WorkerFailedError, match="out of memory"):
            await rt.apply(Placement(4, SPLITS, ((0,), (1,), (2,))))
        w0 = rt.workers[0]
        assert Kind.PREPARE not in w0.kinds()
        retired = [f["rings"] for k, f in w0.sent if k == Kind.RETIRE]
        assert len(retired) == 1 and len(retired[0]) == 2
        assert rt.pipelines == {}
    finally:
        await rt.close()


async def test_losing_a_ring_owner_fails_rows_that_need_its_ring_and_holds_new_ones():
    rt = await gpu_runtime(["cuda:0", "cuda:1", "cuda:0"])
    answers = {}
    try:
        epoch = await rt.apply(Placement(4, SPLITS, ((0,), (1,), (1,))))
        p = rt.pipelines[epoch]
        p.on_answer = lambda sample, outcome: answers.setdefault(sample.rid, outcome)
        from e3.runtime.batcher import Row, Sample
        loop = asyncio.get_running_loop()

        def sample(rid):
            now = loop.time()
            return Sample(rid, loop.create_future(), now, now + 10, now + 20, epoch,
                          BatchState({"hidden": torch.zeros(1, 8, dtype=torch.float64)}))
        # One row waiting at split 1 in slot 0 of the GPU ring, one unstarted at split 0.
        slot = p.pools[1].acquire()
        p.stages[1].queue.push([Row(sample(1), slot, 0)])
        p.stages[0].queue.push([Row(sample(2))])
        assert p.on_worker_lost(2) is False and not p.lost_rings    # owns no ring
        rt.workers[0].alive = False
        assert p.on_worker_lost(0) is True
        p.pump(loop.time())
        assert isinstance(answers.get(1), WorkerFailedError) and "GPU ring" in str(answers[1])
        assert 2 not in answers and len(p.stages[0].queue) == 1    # held for the next epoch
        assert p.pools[1].free == p.pools[1].ring.spec.slots       # the slot went back
        assert [s.rid for s in p.take_unstarted()] == [2]
    finally:
        await rt.close()


def test_a_cpu_worker_refuses_to_allocate_or_open_a_cuda_ring():
    engine = WorkerEngine(MLPModel(), make_policy("patience", 2), "cpu")
    spec = RingSpec("e0s1-x", "", 2, 4, SPEC.fields)
    reply = engine.handle({"k": Kind.ALLOC_RING, "epoch": 0, "owner": 0, "rings": [{"ring": spec.to_wire(),
                                                                                      "share": True}]})
    assert reply["k"] == Kind.FAILED and reply["epoch"] == 0
    assert "needs a CUDA worker" in reply["error"] and "cpu" in reply["error"]
    shared = RingSpec("e0s1-x", "", 2, 4, SPEC.fields, CudaIpc(0, 1, FAKE_STORAGE, (b"\x00" * 64,) * 2))
    reply = engine.handle({"k": Kind.PREPARE, "epoch": 0, "batch": 4, "rings": [shared.to_wire()], "splits": []})
    assert reply["k"] == Kind.FAILED and "runs on cpu" in reply["error"]


# -- on a GPU ------------------------------------------------------------------

def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    return proc, parent


@contextlib.contextmanager
def _talking_to(ring, target, *args):
    """A spawned child holding `ring`'s handles, over a pipe; on the way out it is joined and the
    ring closed, and a child that did not exit cleanly fails the test."""
    proc, conn = _spawn(target, msgpack.packb(ring.spec.to_wire(), use_bin_type=True), *args)
    try:
        yield conn
    finally:
        proc.join(30)
        ring.close()
    assert proc.exitcode == 0


def _recv(conn, timeout=60):
    assert conn.poll(timeout), "the other process did not answer"
    return msgpack.unpackb(conn.recv_bytes(), raw=False)


def _send(conn, obj):
    conn.send_bytes(msgpack.packb(obj, use_bin_type=True))


def _state(rows, base, device):
    hidden = torch.arange(rows * 24, dtype=torch.float32, device=device).reshape(rows, 4, 6) + base
    return BatchState({"hidden": hidden, "mask": torch.full((rows, 4), base, dtype=torch.int64, device=device)})


def _child_round_trip(conn, wire):
    """Open the ring by its handles, send back what slot 1 holds, write slot 2."""
    from e3.runtime.cuda_ring import CudaSlotRing
    ring = CudaSlotRing.open(RingSpec.from_wire(msgpack.unpackb(wire, raw=False)), "cuda:0")
    got = ring.read(1, 0, 3)
    _send(conn, {"hidden": got["hidden"].cpu().tolist(), "mask": got["mask"].cpu().tolist()})
    ring.write(2, 1, _state(2, 500, "cuda:0"))
    _send(conn, "written")
    _recv(conn)                        # the owner has read slot 2
    ring.close()
    _send(conn, "closed")


def _child_slow_writer(conn, wire, cycles):
    """Write a large slot after a long kernel; say so at once, without synchronising."""
    from e3.runtime.cuda_ring import CudaSlotRing
    ring = CudaSlotRing.open(RingSpec.from_wire(msgpack.unpackb(wire, raw=False)), "cuda:0")
    big = torch.full((ring.spec.capacity, *ring.spec.fields[0].shape), 7.0, device="cuda:0")
    torch.cuda._sleep(cycles)          # the write below waits for this on the same stream
    ring.write(0, 0, BatchState({"hidden": big}))
    _send(conn, "recorded")
    _recv(conn)
    ring.close()
    _send(conn, "closed")


@needs_cuda
def test_two_processes_share_a_ring_through_ipc_handles():
    from e3.runtime.cuda_ring import CudaSlotRing
    ring = CudaSlotRing.allocate(RingSpec("rt", "", 4, 8, SPEC.fields), "cuda:0", owner=0, share=True)
    ring.write(1, 0, _state(3, 10, "cuda:0"))
    torch.cuda.synchronize()
    with _talking_to(ring, _child_round_trip) as conn:
        got = _recv(conn)
        want = _state(3, 10, "cpu")
        assert got == {"hidden": want["hidden"].tolist(), "mask": want["mask"].tolist()}
        assert _recv(conn) == "written"
        back = ring.read(2, 1, 2)
        assert torch.equal(back["hidden"].cpu(), _state(2, 500, "cpu")["hidden"])
        assert torch.equal(back["mask"].cpu(), torch.full((2, 4), 500))
        _send(conn, "ok")
        assert _recv(conn) == "closed"


@needs_cuda
def test_the_reader_waits_for_the_writers_event():
    from e3.runtime.cuda_ring import CudaSlotRing
    fields = (FieldSpec("hidden", (32, 384), torch.float32),)
    ring = CudaSlotRing.allocate(RingSpec("ev", "", 2, 256, fields), "cuda:0", owner=0, share=True)
    khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 2_000_000)   # absent in some older torch
    cycles = int(khz * 1000 * 1.5)    # about 1.5 s of spinning
    with _talking_to(ring, _child_slow_writer, cycles) as conn:
        assert _recv(conn) == "recorded"
        # The write is still queued behind the sleep: without the event we would read zeros.
        assert not ring._events[0].query(), "the writer finished too early for this test to mean anything"
        got = ring.read(0, 0, 256)["hidden"].clone()
        assert bool((got == 7.0).all())
        _send(conn, "ok")
        assert _recv(conn) == "closed"


@needs_cuda
def test_closing_frees_the_gpu_memory():
    from e3.runtime.cuda_ring import CudaSlotRing, collect_released
    fields = (FieldSpec("hidden", (32, 384), torch.float32),)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(0)
    private = CudaSlotRing.allocate(RingSpec("own", "", 4, 64, fields), "cuda:0", owner=0, share=False)
    assert torch.cuda.memory_allocated(0) >= base + private.spec.nbytes
    private.close()
    assert torch.cuda.memory_allocated(0) == base
    shared = CudaSlotRing.allocate(RingSpec("sh", "", 4, 64, fields), "cuda:0", owner=0, share=True)
    with _talking_to(shared, _child_round_trip) as conn:
        _recv(conn), _recv(conn)
        _send(conn, "ok")
        assert _recv(conn) == "closed"        # the opener has released its mapping
    collect_released()
    assert torch.cuda.memory_allocated(0) == base


@pytest.fixture
def default_model_dir(e3_cache):
    from e3.models.registry import resolve
    return resolve("digits")


@needs_cuda
@pytest.mark.e2e
@pytest.mark.parametrize("devices", [["cuda:0", "cuda:0"], ["cuda:0"]])
async def test_a_node_with_gpu_workers_answers_as_the_reference(default_model_dir, devices):
    from e3.models.executor import reference_forward
    from e3.models.registry import load_model
    from e3.runtime.examples import load_examples
    inputs, labels = load_examples(default_model_dir, 240)
    loaded = load_model(default_model_dir)
    meta = loaded.model.meta
    cuts = [meta.ramp_blocks[0], meta.ramp_blocks[-1]]
    c = E3Config()
    c.model.path = "digits"
    c.model.path = str(default_model_dir)
    c.workers.mode, c.workers.devices = "process", list(devices)
    c.batching.batch, c.batching.cuts = 8, cuts
    c.batching.max_queue_delay_ms = c.batching.timeout_ms    # a burst of requests, not overload
    c.replan.enabled = False
    async with Runtime(c) as rt:
        rings = rt.pipelines[rt.epoch].cuda_rings()
        assert len(rings) == 2 and all(r.allocated for r in rings)
        assert all(r.share == (len(devices) > 1) for r in rings)
        results = await asyncio.gather(*(rt.infer(inputs[i:i + 4]) for i in range(0, len(inputs), 4)))
    got = [(r.label, r.exit_point) for batch in results for r in batch]
    xs = [torch.tensor(x) for x in inputs]
    enabled = [meta.ramp_at(cut) for cut in cuts]
    ref = [(a.label, a.exit_point) for a in reference_forward(loaded.model, loaded.policy, xs, enabled)]
    # GPU kernels (TF32 convolutions) differ from the CPU in the last bits: a
    # decision within a hair of the threshold may flip, nothing more.
    differ = [i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert len(differ) <= len(ref) // 50, differ
    assert len({e for _, e in got}) >= 2
    assert sum(g[0] == y for g, y in zip(got, labels)) / len(labels) > 0.9
