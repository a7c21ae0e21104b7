"""The rebatcher inside a pipeline: survivors of several batches merged into one batch of B.

Workers are scripted (they record RUN messages; the test answers them) and time is
passed in, so each test states exactly which rows survive and when, with no sleeps.
Real shared-memory rings carry the rows; only the model compute is left out.
"""
import asyncio

import numpy as np
import pytest

from e3.models.policies import make_policy
from e3.runtime.batcher import Sample
from e3.runtime.pipeline import Pipeline, Placement
from e3.runtime.slots import boundary_slots
from e3.runtime.wire import Kind
from e3.runtime.worker_client import WorkerClient
from tests.support.mlp import CLASSES, WIDTH, MLPModel

MODEL = MLPModel()
SPLITS = ((0, 1), (2, 5))                 # split 0 ends at ramp 1; split 1 runs to the head


class ScriptedWorker(WorkerClient):
    """Takes RUN messages and keeps them for the test to answer."""

    def __init__(self, worker_id: int):
        super().__init__(worker_id, "cpu", None, None)
        self.alive, self.runs = True, []

    async def start(self):
        pass

    async def stop(self):
        pass

    def send(self, kind, **fields):
        if kind == Kind.RUN:
            self.runs.append(fields)


class Harness:
    """A two-split pipeline on scripted workers 0 (split 0) and 1 (split 1)."""

    def __init__(self, batch=8, slots=16, ring_slots=(), slo_s=10.0, **kw):
        self.workers = {0: ScriptedWorker(0), 1: ScriptedWorker(1)}
        placement = Placement(batch, SPLITS, ((0,), (1,)), (0.001, 0.001), ring_slots)
        self.p = Pipeline(0, MODEL.meta, make_policy("entropy", 0.3), placement, self.workers,
                          admission_rows=4096, slots_per_ring=slots, sample_fraction=0.0, max_inflight=1,
                          max_attempts=1, on_answer=lambda s, o: None, **kw)
        self.p.prepared.update(self.workers.values())
        self.loop, self.slo_s, self.rid = asyncio.get_running_loop(), slo_s, 0
        self.split1_rows: list[int] = []

    def admit(self, n: int, now: float) -> None:
        state = MODEL.encode([[0.1 * (i % 7)] * WIDTH for i in range(n)])
        samples = []
        for i in range(n):
            samples.append(Sample(self.rid, self.loop.create_future(), now, now + self.slo_s, now + 100.0,
                                  0, state.select([i])))
            self.rid += 1
        self.p.admit(samples)

    def run(self, now: float, survivors_per_batch: int) -> None:
        """Pump, then answer every RUN: split 0 keeps the first rows of each batch going on."""
        self.p.pump(now)
        while any(w.runs for w in self.workers.values()):
            for w in self.workers.values():
                while w.runs:
                    self.p.on_done(self.reply(w.runs.pop(0), survivors_per_batch), now)
            self.p.pump(now)

    def reply(self, run: dict, keep: int) -> dict:
        rows = sum(seg[3] for seg in run["src"])
        if run["split"] == list(SPLITS[0]):
            survivors, exit_point = list(range(min(keep, rows))), MODEL.meta.ramp_at(1)
        else:
            self.split1_rows.append(rows)
            survivors, exit_point = [], MODEL.meta.head_exit
        exited = [i for i in range(rows) if i not in survivors]
        return {"id": run["id"], "exit": exit_point, "exited": exited, "survivors": survivors,
                "logits": np.zeros((len(exited), CLASSES), np.float32).tobytes(), "observed": {},
                "compute_s": 0.001}

    def close(self):
        self.p.close()


@pytest.fixture
def harness():
    made = []

    def make(**kw):
        made.append(Harness(**kw))
        return made[-1]
    yield make
    for h in made:
        h.close()


async def test_segment_layout_is_what_the_harness_reads(harness):
    """The harness counts a batch's rows from its src segments: [ring, slot, first row, rows]."""
    h = harness()
    h.admit(8, 0.0)
    h.p.pump(0.0)
    [run] = h.workers[0].runs
    assert sum(seg[3] for seg in run["src"]) == 8


async def test_survivors_of_several_batches_merge_into_one_full_batch(harness):
    """B = 8 and 2 of 8 rows go on: four split-0 batches fill one split-1 batch of 8."""
    h = harness(work_conserving=False)
    h.admit(64, 0.0)
    h.run(0.0, survivors_per_batch=2)
    assert h.split1_rows == [8, 8]


async def test_a_partial_merge_waits_for_its_deadline_then_flushes(harness):
    """3 survivors can't fill B = 8: they wait while the oldest row's SLO allows, then go."""
    h = harness(slo_s=0.5, work_conserving=False)
    h.admit(8, 0.0)
    h.run(0.0, survivors_per_batch=3)
    assert h.split1_rows == []
    flush_at = h.p.stages[1].queue.flush_at(h.p._budget(h.p.stages[1]))
    assert 0.3 < flush_at < 0.5
    h.run(flush_at - 0.01, survivors_per_batch=3)
    assert h.split1_rows == []
    h.run(flush_at, survivors_per_batch=3)
    assert h.split1_rows == [3]


async def test_a_full_input_ring_sends_what_it_holds_at_once(harness):
    """1 of 8 rows goes on and the boundary ring has 4 slots: after 4 batches no survivor can
    arrive until split 1 runs, so waiting for its deadline would buy only latency."""
    h = harness(slots=4, slo_s=10.0, work_conserving=False)
    h.admit(64, 0.0)
    h.run(0.0, survivors_per_batch=1)
    assert h.split1_rows and all(n <= 4 for n in h.split1_rows), h.split1_rows
    assert sum(h.split1_rows) == 8


async def test_rings_sized_for_the_survival_fill_the_batch(harness):
    """The same traffic with rings sized by boundary_slots for 1/8 going on: full batches."""
    slots = boundary_slots(8, [1.0, 1 / 8], [1, 1], max_inflight=1, base=4)
    assert slots[0] == 4 and slots[1] >= 8
    h = harness(slots=4, ring_slots=slots, slo_s=10.0, work_conserving=False)
    h.admit(64, 0.0)
    h.run(0.0, survivors_per_batch=1)
    assert h.split1_rows == [8]


def test_boundary_slots_grow_as_survival_falls_and_stay_bounded():
    high = boundary_slots(8, [1.0, 0.5], [1, 1], max_inflight=2, base=16)
    low = boundary_slots(8, [1.0, 0.05], [1, 1], max_inflight=2, base=16)
    none = boundary_slots(64, [1.0, 0.0], [2, 2], max_inflight=2, base=16)
    assert high == (16, 16) and low[1] > 16 and none[1] == 64


async def test_replicas_are_fed_least_loaded(harness):
    """Split 0 on workers 0 and 1, two batches in flight each at most: batches go to
    whichever has fewer in flight, and a worker that answers gets the next one."""
    h = harness(work_conserving=False)
    h.workers[2] = ScriptedWorker(2)
    placement = Placement(8, SPLITS, ((0, 2), (1,)), (0.001, 0.001))
    h.p.close()
    h.p = Pipeline(0, MODEL.meta, make_policy("entropy", 0.3), placement, h.workers, admission_rows=4096,
                   slots_per_ring=16, sample_fraction=0.0, max_inflight=2, max_attempts=1,
                   on_answer=lambda s, o: None, work_conserving=False)
    h.p.prepared.update(h.workers.values())
    h.admit(8 * 2, 0.0)
    h.p.pump(0.0)
    assert (len(h.workers[0].runs), len(h.workers[2].runs)) == (1, 1)   # not both to the first
    h.admit(8 * 3, 0.0)
    h.p.pump(0.0)
    assert (len(h.workers[0].runs), len(h.workers[2].runs)) == (2, 2)   # both full; one batch waits
    h.p.on_done(h.reply(h.workers[2].runs.pop(0), 0), 0.0)
    h.p.pump(0.0)
    assert (len(h.workers[0].runs), len(h.workers[2].runs)) == (2, 2)   # it went to the one that answered


def hedging_pipeline(h, max_attempts=2):
    """Split 0 on workers 0 and 2 (one batch in flight each), split 1 on worker 1; answers recorded."""
    h.workers[2] = ScriptedWorker(2)
    h.p.close()
    answers = {}
    h.p = Pipeline(0, MODEL.meta, make_policy("entropy", 0.3), Placement(8, SPLITS, ((0, 2), (1,)), (0.001, 0.001)),
                   h.workers, admission_rows=4096, slots_per_ring=4, sample_fraction=0.0, max_inflight=1,
                   max_attempts=max_attempts, on_answer=lambda s, o: answers.setdefault(s.rid, []).append(o),
                   work_conserving=False, hedge_factor=4.0, hedge_floor_s=0.1,
                   on_hedge=lambda: answers.setdefault("hedged", []).append(1))
    h.p.prepared.update(h.workers.values())
    return answers


async def test_a_held_batch_is_sent_again_elsewhere_and_answered_once(harness):
    h = harness()
    answers = hedging_pipeline(h)
    admission, survivors = h.p.pools
    h.admit(8, 0.0)
    h.p.pump(0.0)
    first, other = (h.workers[0], h.workers[2]) if h.workers[0].runs else (h.workers[2], h.workers[0])
    assert len(first.runs) == 1 and not other.runs
    assert h.p.pump(0.05) == pytest.approx(0.1)          # due at the floor: the pump says when
    assert not other.runs
    h.p.pump(0.1)
    [held], [hedge] = first.runs, other.runs
    assert hedge["id"] == held["id"] and hedge["src"] == held["src"] and hedge["dst"] != held["dst"]
    assert first.suspect and not other.suspect and h.p.hedges == 1 and answers.pop("hedged") == [1]
    h.admit(8, 0.1)
    h.p.pump(0.1)
    assert len(first.runs) == 1 and len(other.runs) == 1   # the suspect gets nothing new
    assert h.p.on_done(h.reply(other.runs.pop(0), 3), 0.12, other) is not None
    assert sorted(answers) == list(range(3, 8)) and all(len(a) == 1 for a in answers.values())
    assert len(h.p.stages[1].queue) == 3                   # survivors, from the hedge's slot
    in_use = admission.in_use
    assert in_use >= 1 and survivors.in_use == 2           # the stale copy still holds its rows and slot
    assert h.p.on_done(h.reply(first.runs.pop(0), 3), 0.5, first) is None   # the stale reply
    assert all(len(a) == 1 for a in answers.values()) and len(h.p.stages[1].queue) == 3
    assert admission.in_use == in_use - 1 and survivors.in_use == 1 and not first.suspect
    assert not h.p.holds_stale()


async def test_a_stale_copy_whose_worker_dies_gives_back_what_it_held(harness):
    h = harness()
    hedging_pipeline(h)
    h.admit(8, 0.0)
    h.p.pump(0.0)
    first, other = (h.workers[0], h.workers[2]) if h.workers[0].runs else (h.workers[2], h.workers[0])
    h.p.pump(0.2)
    h.p.on_done(h.reply(other.runs.pop(0), 0), 0.2, other)
    assert h.p.holds_stale()
    first.alive = False
    h.p.on_worker_lost(first.worker_id)
    assert not h.p.holds_stale() and first.inflight == 0
    assert all(pool.in_use == 0 for pool in h.p.pools)


async def test_no_hedge_once_the_attempts_are_spent(harness):
    h = harness()
    hedging_pipeline(h, max_attempts=1)
    h.admit(8, 0.0)
    h.p.pump(0.0)
    h.p.pump(5.0)
    assert sum(len(w.runs) for w in h.workers.values()) == 1 and h.p.hedges == 0


async def test_rows_whose_deadline_passes_at_a_split_are_told_what_held_them(harness):
    """Survivors queue at split 1 behind a batch its only worker never answers: at their deadline
    each gets a 504 that names the split, and the worker's state and oldest batch in flight."""
    h = harness()
    answers = []
    h.p.on_answer = lambda sample, outcome: answers.append(outcome)
    for now in (0.0, 1.0):                 # the first batch's survivors take worker 1's only place
        h.admit(8, now)
        h.p.pump(now)
        [run] = h.workers[0].runs
        h.workers[0].runs.clear()
        h.p.on_done(h.reply(run, keep=3), now)
        h.p.pump(now)
    assert len(h.workers[1].runs) == 1 and len(h.p.stages[1].queue) == 3
    h.p.pump(101.5)                        # the second batch's survivors were due at 101.0
    late = [str(a) for a in answers if isinstance(a, Exception)]
    assert len(late) == 3, answers
    assert all("waiting at split 1 (worker 1: 1 of 1 batches in flight, oldest sent 101.500 s ago)" in m
               for m in late), late
