"""Shared-memory slot rings: layout, cross-process visibility, accounting, stale files."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e3.models.state import BatchState, FieldSpec, StateSpec
from e3.runtime import slots
from e3.runtime.slots import RingSpec, SlotPool, SlotRing, gather

SPEC = StateSpec((FieldSpec("hidden", (3, 5), torch.float32), FieldSpec("mask", (3,), torch.int64),
                  FieldSpec("exit.count", (), torch.int64)))


@pytest.fixture
def ring():
    r = SlotRing.create(SPEC, slots=4, capacity=8, tag="test")
    yield r
    r.close()


def _state(rows, base=0):
    return BatchState({"hidden": torch.arange(rows * 15, dtype=torch.float32).reshape(rows, 3, 5) + base,
                       "mask": torch.ones(rows, 3, dtype=torch.int64),
                       "exit.count": torch.arange(rows) + base})


def test_gather_merges_segments_of_several_slots(ring):
    a, b = _state(4), _state(3, base=100)
    ring.write(0, 0, a)
    ring.write(2, 0, b)
    merged = gather([(ring, 0, 1, 2), (ring, 2, 0, 3)])
    assert merged["exit.count"].tolist() == [1, 2, 100, 101, 102]
    assert torch.equal(merged["hidden"][2], b["hidden"][0])


def test_gather_copies_so_the_slot_can_be_reused(ring):
    ring.write(1, 0, _state(2))
    batch = gather([(ring, 1, 0, 2)])
    ring.write(1, 0, _state(2, base=50))
    assert batch["exit.count"].tolist() == [0, 1]


def test_wire_round_trip_and_alignment(ring):
    spec = RingSpec.from_wire(ring.spec.to_wire())
    assert spec == ring.spec
    assert all(off % 64 == 0 for _, off, _ in spec.layout())


def test_another_process_sees_the_rows(ring):
    ring.write(3, 0, _state(2, base=7))
    code = ("import json,sys;from e3.runtime.slots import RingSpec,SlotRing,gather;"
            "r=SlotRing.attach(RingSpec.from_wire(json.loads(sys.argv[1])));"
            "s=gather([(r,3,0,2)]);print(s['exit.count'].tolist());"
            "import torch;r.write(3,0,s.replace(**{'exit.count':torch.tensor([41,42])}));r.close()")
    import json
    out = subprocess.run([sys.executable, "-c", code, json.dumps(ring.spec.to_wire())],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[7, 8]"
    assert ring.read(3, 0, 2)["exit.count"].tolist() == [41, 42]


def test_pool_frees_a_slot_when_every_row_is_done(ring):
    pool = SlotPool(ring)
    slots = [pool.acquire() for _ in range(4)]
    assert pool.acquire() is None and pool.free == 0
    pool.hold(slots[0], 3)
    pool.release(slots[0], 1)          # the producer's reservation
    pool.release(slots[0], 2)
    assert pool.free == 0
    pool.release(slots[0], 1)          # the last row consumed
    assert pool.free == 1 and pool.acquire() == slots[0]


def test_pool_refuses_double_release(ring):
    pool = SlotPool(ring)
    s = pool.acquire()
    pool.release(s)
    with pytest.raises(ValueError, match="release of 1 on slot"):
        pool.release(s)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_sweep_removes_ring_files_of_dead_processes_only(tmp_path):
    dead = _dead_pid()
    stale = [f"e3-{dead}-e0s0-0123456789ab", f"e3-{dead}-e0s1-0123456789ab"]
    kept = [f"e3-{os.getpid()}-e0s0-0123456789ab", "e3-node-x", "e3-1x-y", "other"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"ring")
    assert slots.sweep_stale_rings(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_the_first_ring_of_a_process_sweeps_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(slots, "_shm_root", lambda: tmp_path)
    monkeypatch.setattr(slots, "_swept", False)
    (tmp_path / f"e3-{_dead_pid()}-e0s0-0123456789ab").write_bytes(b"ring")
    with caplog.at_level(logging.INFO, logger="e3.runtime.slots"):
        first = SlotRing.create(SPEC, slots=2, capacity=2)
    assert "removed 1 ring file(s)" in caplog.text
    late = tmp_path / f"e3-{_dead_pid()}-e0s0-0123456789ab"
    late.write_bytes(b"ring")
    second = SlotRing.create(SPEC, slots=2, capacity=2)
    assert late.exists()               # once per process, not per ring: epochs create rings on every swap
    assert sorted(tmp_path.iterdir()) == sorted([late, Path(first.spec.path), Path(second.spec.path)])
    first.close()
    second.close()


def test_sweep_removes_socket_dirs_of_dead_nodes_only(tmp_path):
    from e3.runtime.worker_client import sweep_stale_socket_dirs
    dead = _dead_pid()
    stale, kept = [f"e3-node-{dead}-abc123"], [f"e3-node-{os.getpid()}-abc123", "e3-node-abc123", "other"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "workers.sock").write_bytes(b"")
    (tmp_path / f"e3-node-{dead}-file").write_bytes(b"not a directory")
    assert sweep_stale_socket_dirs(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [f"e3-node-{dead}-file"])
