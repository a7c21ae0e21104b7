"""One plan epoch running on the workers: stages, rings, batches in flight.

Stage i runs split i. Its entry is a RowQueue (stage 0: the admission
batcher; later stages: rebatchers of the survivors of stage i-1), and its
input rows lie in ring i: the admission ring for stage 0, the survivor ring
written by stage i-1 otherwise. A batch of stage i names row segments of ring
i and one slot of ring i+1 for its survivors, and is sent to the least loaded
live worker that runs split i. Exited rows are answered at once.

The pipeline is pure bookkeeping on the event loop: it never computes and
never waits; `pump(now)` dispatches what is due and says when to call again.
Its workers are the pool's live mapping of handles by id (worker_pool.py): a
worker the pool restarts appears under its old id, and gets batches of this
epoch once the Runtime has prepared it.

Rings: the admission ring is shared memory (the node writes it). A survivor
ring is GPU memory (cuda_ring.py) when every worker that writes or reads it is
a GPU worker process; the node then holds only its accounting (NodeCudaRing)
and the Runtime has the owner allocate it (a pool call) before PREPARE. A CUDA ring dies
with its owner: the pipeline then fails the rows that need it and stops
admitting, and the Runtime moves what was not started to a fresh epoch.

Hedging: a batch out longer than hedge_factor x its split's expected batch
time (sooner if a second run would otherwise miss its rows' earliest deadline,
never sooner than hedge_floor_s) is sent again, to another live worker of its
split, before any new batch, with an output slot of its own. The first reply wins; the other copy's reply is
stale and only gives back what it held. A batch's input rows stay held until
every copy of it has answered or died (a stopped worker may wake and read
them), and each copy's output slot until that copy ends. The worker that held
it is suspect: it gets no new batch until it answers. A hedge is an attempt
(workers.max_attempts counts it).
"""
from __future__ import annotations

import itertools
import time
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from e3.models.base import ModelMeta
from e3.models.executor import state_spec_entering
from e3.models.policies import ExitPolicy
from e3.models.state import BatchState

from .batcher import Row, RowQueue, Sample
from .errors import ConfigError, DeadlineExceededError, WorkerFailedError
from .cuda_ring import NodeCudaRing, cuda_ring_applies
from .slots import SlotPool, SlotRing
from .worker_client import WorkerClient
from .wire import Kind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where an epoch's splits run: the runtime's view of a plan."""

    batch: int
    splits: tuple[tuple[int, int], ...]
    workers: tuple[tuple[int, ...], ...]      # worker ids per split
    stage_s: tuple[float, ...] = ()           # predicted seconds per batch per split
    ring_slots: tuple[int, ...] = ()          # slots of each split's input ring (slots.boundary_slots);
                                              # () for batching.slots_per_ring everywhere

    def check(self, meta: ModelMeta, worker_ids: Sequence[int]) -> None:
        if self.batch < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch}")
        if not self.splits or self.splits[0][0] != 0 or self.splits[-1][1] != meta.num_blocks - 1 or any(
                b[0] != a[1] + 1 for a, b in zip(self.splits, self.splits[1:])):
            raise ConfigError(f"splits {list(self.splits)} do not cover blocks 0..{meta.num_blocks - 1} in order")
        for first, last in self.splits[:-1]:
            if meta.ramp_at(last) is None:
                raise ConfigError(f"split {first}..{last} does not end at a ramp (ramps after {meta.ramp_blocks})")
        if len(self.workers) != len(self.splits) or any(not w or set(w) - set(worker_ids) for w in self.workers):
            raise ConfigError(f"workers {list(self.workers)} must name one or more of {list(worker_ids)} per split")
        if self.ring_slots and (len(self.ring_slots) != len(self.splits) or min(self.ring_slots) < 2):
            raise ConfigError(f"ring_slots {list(self.ring_slots)} must give each of the {len(self.splits)} "
                              "splits 2 or more slots")

    def to_json(self) -> dict:
        return {"batch": self.batch, "splits": [list(s) for s in self.splits],
                "workers": [list(w) for w in self.workers], "stage_s": list(self.stage_s),
                "ring_slots": list(self.ring_slots)}


@dataclass
class Result:
    """The answer for one input."""

    label: int
    logits: list[float]
    exit_point: int
    exit_block: int
    epoch: int


@dataclass(eq=False)
class Copy:
    """One send of a batch to a worker, out until that worker answers it or dies."""

    worker: WorkerClient
    out_slot: int | None        # where this copy writes its survivors (reserved for it alone)
    sent_at: float


@dataclass(eq=False)
class Batch:
    bid: int
    stage: int
    rows: list[Row]
    out_slot: int | None        # the output slot reserved for the next send (a copy takes it)
    observe: bool
    attempts: int = 0
    sent_at: float = 0.0        # when it left its queue (first send, or the send after its worker died)
    idle_sent: bool = False     # its worker had nothing in flight: the round trip holds no queueing
    sent_fine: float = 0.0      # send time on the fine clock (the loop's clock ticks in whole ms on uvloop)
    copies: list[Copy] = field(default_factory=list)
    answered: bool = False      # its rows have their outcome; copies still out are stale

    @property
    def worker(self) -> WorkerClient | None:
        """The worker of the latest copy still out."""
        return self.copies[-1].worker if self.copies else None


@dataclass
class EpochStats:
    """Counts since the planner actor last read them."""

    entered: list[int]
    exits: list[int]
    observed: list[int]          # sampled would-exits at disabled ramps
    observed_entered: list[int]  # rows that entered a sampled batch, per stage
    batch_rows: list[list[int]] = field(default_factory=list)
    idle_timings: list[tuple[int, int, float]] = field(default_factory=list)   # (stage, rows, round trip s)
    busy_s: list[float] = field(default_factory=list)     # per stage: the workers' compute seconds
    batches: list[int] = field(default_factory=list)      # per stage: batches finished


def _bounded_append(values: list, value, keep: int = 4096) -> None:
    """Stats are read (and reset) by the planner actor; without one, keep only the recent past."""
    values.append(value)
    if len(values) > 2 * keep:
        del values[:-keep]


class Stage:
    def __init__(self, index: int, split: tuple[int, int], worker_ids: tuple[int, ...],
                 queue: RowQueue, in_pool: SlotPool, out_pool: SlotPool | None, est_s: float):
        self.index, self.split, self.worker_ids = index, split, worker_ids
        self.queue, self.in_pool, self.out_pool = queue, in_pool, out_pool
        self.est_s = est_s
        self.inflight: dict[int, Batch] = {}
        self.retry: list[Batch] = []
        self.stale: dict[int, Batch] = {}       # answered, with a copy still out (it holds its rows)

    def idle(self) -> bool:
        """Nothing left to answer here (stale copies hold slots, not answers)."""
        return not (self.inflight or self.retry or len(self.queue))


class Pipeline:
    """The stages of one epoch and the batches moving through them."""

    def __init__(self, epoch: int, meta: ModelMeta, policy: ExitPolicy, placement: Placement,
                 workers: Mapping[int, WorkerClient], *, admission_rows: int, slots_per_ring: int,
                 sample_fraction: float, max_inflight: int, max_attempts: int,
                 on_answer: Callable[[Sample, Result | BaseException], None], hop_s: float = 0.002,
                 seed: int = 0, rebatch: bool = True, work_conserving: bool = True,
                 admission_delay_s: float | None = None, hedge_factor: float | None = None,
                 hedge_floor_s: float = 0.25, on_hedge: Callable[[], None] | None = None,
                 fine_clock: Callable[[], float] = time.perf_counter):
        """`hedge_factor`: resend a batch out longer than max(hedge_factor x its split's
        expected time, hedge_floor_s) to another worker (None: never); `on_hedge` hears of each."""
        placement.check(meta, list(workers))
        self.epoch, self.meta, self.policy, self.placement = epoch, meta, policy, placement
        self.workers, self.on_answer = workers, on_answer
        self.sample_fraction, self.max_inflight, self.max_attempts = sample_fraction, max_inflight, max_attempts
        self.hop_s = hop_s
        self.hedge_factor, self.hedge_floor_s = hedge_factor, hedge_floor_s
        self.hedges, self.on_hedge = 0, on_hedge
        self._fine_clock = fine_clock
        self._rng = random.Random(seed)
        self._ids = itertools.count()
        self.draining = False
        b = placement.batch
        self.lost_rings: dict[str, int] = {}     # CUDA ring id -> the dead worker that owned it
        slots = placement.ring_slots or (slots_per_ring,) * len(placement.splits)
        self.pools = [SlotPool(self._make_ring(i, first, slots[i])) for i, (first, _) in enumerate(placement.splits)]
        est = placement.stage_s or (0.005,) * len(placement.splits)
        # rebatch=False: survivors go on at once as a shrunken batch (the ee-batch baseline)
        queues = [RowQueue(b, admission_rows if i == 0 else None, eager=i > 0 and not rebatch,
                           work_conserving=work_conserving, max_delay_s=admission_delay_s if i == 0 else None)
                  for i in range(len(placement.splits))]
        self.stages = [Stage(i, s, w, q, self.pools[i],
                             self.pools[i + 1] if i + 1 < len(self.pools) else None, est[i])
                       for i, (s, w, q) in enumerate(zip(placement.splits, placement.workers, queues))]
        self.stats = self._fresh_stats()
        # Workers that have mapped this epoch's rings and loaded its splits. A worker
        # restarted while an epoch runs is alive before it is prepared; it gets no batch until then.
        self.prepared: set[WorkerClient] = set()

    # -- wiring ------------------------------------------------------------

    def _make_ring(self, index: int, first: int, slots: int) -> SlotRing | NodeCudaRing:
        """Ring `index` holds stage `index`'s input rows: GPU memory when its writers and readers
        allow it (cuda_ring_applies), shared memory otherwise and always for the admission ring."""
        spec, tag = state_spec_entering(self.meta, self.policy, first), f"e{self.epoch}s{index}"
        if index > 0:
            writers = self.placement.workers[index - 1]
            participants = sorted(set(writers) | set(self.placement.workers[index]))
            workers = [self.workers[w] for w in participants]
            if cuda_ring_applies([w.device for w in workers], all(w.own_process for w in workers)):
                return NodeCudaRing.plan(spec, slots, self.placement.batch, f"{tag}-{uuid.uuid4().hex[:12]}",
                                         self._ring_owner(writers), participants)
        return SlotRing.create(spec, slots, self.placement.batch, tag=tag)

    def _ring_owner(self, writers: tuple[int, ...]) -> int:
        """The worker that allocates a CUDA ring: a live writer, so that its own writes stay local."""
        return next((w for w in writers if self.workers[w].alive), writers[0])

    def ring_specs(self, worker_id: int | None = None) -> list[dict]:
        """Every ring's wire form; for `worker_id`, CUDA rings only where it writes or reads them."""
        return [p.ring.spec.to_wire() for p in self.pools
                if worker_id is None or not isinstance(p.ring, NodeCudaRing) or worker_id in p.ring.participants]

    def ring_ids(self) -> list[str]:
        return [p.ring.spec.ring_id for p in self.pools]

    def cuda_rings(self) -> list[NodeCudaRing]:
        return [p.ring for p in self.pools if isinstance(p.ring, NodeCudaRing)]

    def splits_on(self, worker_id: int) -> list[list[int]]:
        return [list(s.split) for s in self.stages if worker_id in s.worker_ids]

    def _fresh_stats(self) -> EpochStats:
        n = len(self.stages)
        return EpochStats([0] * n, [0] * (self.meta.head_exit + 1), [0] * self.meta.num_ramps, [0] * n,
                          [[] for _ in range(n)], busy_s=[0.0] * n, batches=[0] * n)

    def take_stats(self) -> EpochStats:
        stats, self.stats = self.stats, self._fresh_stats()
        return stats

    # -- admission ---------------------------------------------------------

    def admit(self, samples: Sequence[Sample]) -> None:
        """Queue encoded samples at stage 0; OverloadedError when the queue is full."""
        self.stages[0].queue.push((Row(s, queued_at=s.arrived) for s in samples),
                                  now=max((s.arrived for s in samples), default=None))

    def take_unstarted(self) -> list[Sample]:
        """Samples not yet in any batch (moved to the next epoch on a swap)."""
        return [r.sample for r in self.stages[0].queue.take_all()]

    def idle(self) -> bool:
        return all(s.idle() for s in self.stages)

    def holds_stale(self) -> bool:
        """Whether a stale copy is still out: its worker may yet read or write this epoch's rings."""
        return any(s.stale for s in self.stages)

    def copies_out(self) -> list[tuple[Stage, Batch, Copy]]:
        """Every send not answered yet, stale ones included (the watchdog's view)."""
        return [(s, b, c) for s in self.stages for b in (*s.inflight.values(), *s.stale.values())
                for c in b.copies]

    # -- the pump ----------------------------------------------------------

    def pump(self, now: float) -> float | None:
        """Dispatch every batch that is due; returns when the next one may be."""
        upstream_idle = True
        for stage in self.stages:
            self._expire(stage, now)
            stage.queue.draining = self.draining and upstream_idle
            upstream_idle = upstream_idle and stage.idle()
        # Hedges first: under load new batches would take every free place on the live workers.
        wake = [t for t in (self._hedge(s, now) for s in self.stages) if t is not None]
        for stage in reversed(self.stages):   # downstream first: it frees slots
            while self._dispatch_one(stage, now):
                pass
        self.stages[0].queue.looked_at = now
        wake += [t for t in (s.queue.flush_at(self._budget(s)) for s in self.stages) if t is not None]
        return min(wake) if wake else None

    # -- hedging -----------------------------------------------------------

    def _hedge(self, stage: Stage, now: float) -> float | None:
        """Resend the batches held past their hedge time; returns when the next is due."""
        if self.hedge_factor is None:
            return None
        wake = None
        for batch in list(stage.inflight.values()):
            if len(batch.copies) != 1 or batch.attempts >= self.max_attempts:
                continue
            held = batch.copies[0]
            due = self._hedge_at(stage, batch, held)
            if now < due:
                wake = due if wake is None else min(wake, due)
            elif all(r.sample.future.done() for r in batch.rows):
                continue                # every row already has an answer (its deadline passed)
            elif not self._resend(stage, batch, held, now):
                wake = now + 0.05 if wake is None else min(wake, now + 0.05)   # no worker or slot free yet
        return wake

    def _hedge_at(self, stage: Stage, batch: Batch, held: Copy) -> float:
        """When to send `batch` again: after hedge_factor x the split's expected time, but in
        time for a second run to beat its earliest deadline (the estimate counts queueing at a
        loaded worker, and can exceed what the deadline leaves); never before the floor."""
        est = stage.est_s + self.hop_s
        latest = min(r.sample.deadline for r in batch.rows) - 2 * est
        return held.sent_at + max(self.hedge_floor_s, min(self.hedge_factor * est, latest - held.sent_at))

    def _resend(self, stage: Stage, batch: Batch, held: Copy, now: float) -> bool:
        worker = self._pick_worker(stage, exclude=held.worker)
        if worker is None:
            return False
        if stage.out_pool is not None:
            batch.out_slot = stage.out_pool.acquire()
            if batch.out_slot is None:
                return False
        held.worker.suspect = True
        log.warning("worker %d has held batch %d of split %d for %.0f ms: sent again to worker %d",
                    held.worker.worker_id, batch.bid, stage.index, (now - held.sent_at) * 1e3, worker.worker_id)
        self.hedges += 1
        if self.on_hedge is not None:
            self.on_hedge()
        self._send(stage, batch, worker, now)
        return True

    def _budget(self, stage: Stage) -> float:
        return sum(s.est_s + self.hop_s for s in self.stages[stage.index:])

    def _dispatch_one(self, stage: Stage, now: float) -> bool:
        if self.lost_rings and self._fail_lost(stage):
            return False
        if (stage.retry or (stage.index > 0 and len(stage.queue))) and self._orphaned(stage):
            return False
        worker = self._pick_worker(stage)
        if worker is None:
            return False
        if stage.retry:
            self._send(stage, stage.retry.pop(0), worker, now)
            return True
        if self.lost_rings and stage.index == 0:
            return False      # a broken epoch starts nothing new: its unstarted rows move to the next
        if not stage.queue.due(now, self._budget(stage), worker_idle=worker.inflight == 0,
                               ring_full=self._ring_full(stage)):
            return False
        out_slot = None
        if stage.out_pool is not None:
            out_slot = stage.out_pool.acquire()
            if out_slot is None:
                return False      # backpressure: the next stage still holds every slot
        rows = stage.queue.take()
        if stage.index == 0 and not self._fill_admission_slot(rows):
            if out_slot is not None:
                stage.out_pool.release(out_slot)
            stage.queue.push_front(rows)
            return False
        batch = Batch(next(self._ids), stage.index, rows, out_slot,
                      observe=self._rng.random() < self.sample_fraction)
        _bounded_append(self.stats.batch_rows[stage.index], len(rows))
        self._send(stage, batch, worker, now)
        return True

    def _ring_full(self, stage: Stage) -> bool:
        """No row can join this split's queue until it runs some: every slot of its input
        ring holds rows already waiting here (none is being written upstream)."""
        return stage.index > 0 and stage.in_pool.free == 0 and not self.stages[stage.index - 1].inflight

    def _fill_admission_slot(self, rows: list[Row]) -> bool:
        pool = self.stages[0].in_pool
        slot = pool.acquire()
        if slot is None:
            return False
        pool.hold(slot, len(rows) - 1)
        pool.ring.write(slot, 0, BatchState.concat([r.sample.row for r in rows]))
        for i, r in enumerate(rows):
            r.slot, r.pos, r.sample.row = slot, i, None
        return True

    def _pick_worker(self, stage: Stage, exclude: WorkerClient | None = None) -> WorkerClient | None:
        """The least loaded live, prepared worker of `stage` with room, that is not suspect."""
        live = [w for w in (self.workers[i] for i in stage.worker_ids)
                if w.alive and w in self.prepared and w.inflight < self.max_inflight
                and not w.suspect and w is not exclude]
        return min(live, key=lambda w: w.inflight) if live else None

    def _send(self, stage: Stage, batch: Batch, worker: WorkerClient, now: float) -> None:
        """Send `batch` to `worker`; the new copy takes the reserved output slot."""
        copy = Copy(worker, batch.out_slot, now)
        if not batch.copies:      # a hedge keeps the first send's times
            batch.sent_at, batch.idle_sent, batch.sent_fine = now, worker.inflight == 0, self._fine_clock()
        batch.out_slot = None
        batch.copies.append(copy)
        batch.attempts += 1
        stage.inflight[batch.bid] = batch
        worker.inflight += 1
        dst = [stage.out_pool.ring.spec.ring_id, copy.out_slot] if copy.out_slot is not None else None
        worker.send(Kind.RUN, id=batch.bid, epoch=self.epoch, split=list(stage.split),
                    src=self._segments(stage, batch.rows), dst=dst, observe=batch.observe)

    @staticmethod
    def _segments(stage: Stage, rows: list[Row]) -> list[list]:
        """Runs of consecutive rows in one slot become one [ring, slot, start, count]."""
        ring_id, segs = stage.in_pool.ring.spec.ring_id, []
        for r in rows:
            if segs and segs[-1][1] == r.slot and segs[-1][2] + segs[-1][3] == r.pos:
                segs[-1][3] += 1
            else:
                segs.append([ring_id, r.slot, r.pos, 1])
        return segs

    def _expire(self, stage: Stage, now: float) -> None:
        dead = stage.queue.expire(now)
        if not dead:
            return
        held = self._held_by(stage, now)
        for row in dead:
            self._release_rows(stage, [row])
            self.on_answer(row.sample, DeadlineExceededError(
                f"deadline passed after {now - row.sample.arrived:.3f} s waiting at split {stage.index} ({held})"))

    def _held_by(self, stage: Stage, now: float) -> str:
        """What kept a split's rows waiting: each of its workers' state and its oldest batch in flight."""
        sent = {}
        for s in self.stages:
            for b in s.inflight.values():
                for c in b.copies:
                    sent[c.worker.worker_id] = min(sent.get(c.worker.worker_id, now), c.sent_at)
        parts = []
        for i in stage.worker_ids:
            w = self.workers[i]
            state = ("dead" if not w.alive else "not prepared" if w not in self.prepared
                     else "suspect" if w.suspect else f"{w.inflight} of {self.max_inflight} batches in flight")
            oldest = f", oldest sent {now - sent[i]:.3f} s ago" if i in sent else ""
            parts.append(f"worker {i}: {state}{oldest}")
        return "; ".join(parts)

    # -- replies -----------------------------------------------------------

    def on_done(self, msg: dict, now: float, worker: WorkerClient | None = None) -> tuple[int, Batch] | None:
        """Answer the exits, forward the survivors; the split and batch this reply finished,
        or None for a stale reply (another copy answered first, or its batch was retried)."""
        stage, batch, copy = self._finish(msg, worker)
        if copy is None:
            return None
        if batch.answered:
            self._end_stale(stage, batch, copy)
            return None
        stage.est_s = 0.8 * stage.est_s + 0.2 * max(now - copy.sent_at - self.hop_s, msg["compute_s"])
        if batch.idle_sent and batch.attempts == 1:      # the planner's per-batch cost (planner/calibration.py)
            _bounded_append(self.stats.idle_timings,
                            (stage.index, len(batch.rows), self._fine_clock() - batch.sent_fine))
        self._answer_exits(stage, batch, msg)
        self._forward_survivors(stage, batch, copy.out_slot, msg["survivors"], now)
        self._count(stage, batch, msg)
        self._settle(stage, batch)
        return stage.index, batch

    def on_failed(self, msg: dict, worker: WorkerClient | None = None) -> None:
        """The worker raised on this batch: a deterministic failure, not retried."""
        stage, batch, copy = self._finish(msg, worker)
        if copy is None:
            return
        if batch.answered:
            self._end_stale(stage, batch, copy)
            return
        self._release_out(stage, copy.out_slot)
        self._fail_batch(stage, batch, WorkerFailedError(f"split {stage.index} failed: {msg['error']}"))

    def on_worker_lost(self, worker_id: int) -> bool:
        """Retry the lost worker's batches elsewhere (or after its restart), or fail them.

        Returns whether the worker owned CUDA rings of this epoch: their memory
        died with it, so every batch that needs one fails instead.
        """
        for ring in self.cuda_rings():
            if ring.owner_id == worker_id:
                self.lost_rings[ring.spec.ring_id] = worker_id
        for stage, batch, copy in self.copies_out():
            if copy.worker.worker_id != worker_id:
                continue
            batch.copies.remove(copy)
            copy.worker.inflight -= 1
            if batch.answered:
                self._end_stale(stage, batch, None, copy.out_slot)
            elif batch.copies:             # a hedge of it still runs elsewhere
                self._release_out(stage, copy.out_slot)
            else:
                del stage.inflight[batch.bid]
                batch.out_slot = copy.out_slot     # the dead copy's slot: nobody writes it now
                if batch.attempts < self.max_attempts and not self._lost_ring_of(stage):
                    stage.retry.append(batch)
                else:
                    self._fail_batch(stage, batch, WorkerFailedError(
                        f"worker {worker_id} died running split {stage.index} ({batch.attempts} attempts)"))
        return any(owner == worker_id for owner in self.lost_rings.values())

    def _lost_ring_of(self, stage: Stage) -> str | None:
        """The id of a lost ring that `stage` reads or writes, if any."""
        pools = [stage.in_pool] + ([stage.out_pool] if stage.out_pool is not None else [])
        return next((p.ring.spec.ring_id for p in pools if p.ring.spec.ring_id in self.lost_rings), None)

    def _fail_lost(self, stage: Stage) -> bool:
        """Fail what waits at a stage that needs a lost ring; whether it does."""
        ring_id = self._lost_ring_of(stage)
        if ring_id is None:
            return False
        exc = WorkerFailedError(f"worker {self.lost_rings[ring_id]} died and GPU ring {ring_id} "
                                f"(split {stage.index}) with it")
        while stage.retry:
            self._fail_batch(stage, stage.retry.pop(0), exc)
        if stage.index > 0:           # stage 0's rows are unstarted: they wait for the next epoch
            rows = stage.queue.take_all()
            self._release_rows(stage, rows)
            for row in rows:
                self.on_answer(row.sample, exc)
        return True

    def _orphaned(self, stage: Stage) -> bool:
        """Fail what waits at a stage whose every worker is gone for good (a lost member's,
        remote_pool.py): no restart will bring one back under its id. Stage 0's queued rows are
        unstarted and wait for the next epoch. Whether the stage is orphaned."""
        if not all(getattr(self.workers[i], "gone", False) for i in stage.worker_ids):
            return False
        exc = WorkerFailedError(f"every worker of split {stage.index} was lost with its member node")
        while stage.retry:
            self._fail_batch(stage, stage.retry.pop(0), exc)
        if stage.index > 0:
            rows = stage.queue.take_all()
            self._release_rows(stage, rows)
            for row in rows:
                self.on_answer(row.sample, exc)
        return True

    def _finish(self, msg: dict, worker: WorkerClient | None) -> tuple[Stage | None, Batch | None, Copy | None]:
        """The batch a reply is for and the copy (send) it answers, which ends; no copy for a
        reply nothing waits for (its worker was given up and the batch retried elsewhere).
        `worker` None: the batch's first copy (scripted tests)."""
        bid = msg.get("id")
        for stage in self.stages:
            batch = stage.inflight.get(bid) or stage.stale.get(bid)
            if batch is None:
                continue
            copy = next((c for c in batch.copies if worker is None or c.worker is worker), None)
            if copy is None:
                return stage, batch, None
            batch.copies.remove(copy)
            copy.worker.inflight -= 1
            copy.worker.suspect = False      # it answers again
            return stage, batch, copy
        return None, None, None

    def _settle(self, stage: Stage, batch: Batch) -> None:
        """A batch just got its outcome: its rows' slots go back once no copy of it is out."""
        batch.answered = True
        stage.inflight.pop(batch.bid, None)
        self._release_out(stage, batch.out_slot)
        batch.out_slot = None
        if batch.copies:
            stage.stale[batch.bid] = batch
        else:
            self._release_rows(stage, batch.rows)

    def _end_stale(self, stage: Stage, batch: Batch, copy: Copy | None, out_slot: int | None = None) -> None:
        """A stale copy ended (answered or died): give back its output slot, and the rows once it was the last."""
        self._release_out(stage, copy.out_slot if copy is not None else out_slot)
        if not batch.copies:
            del stage.stale[batch.bid]
            self._release_rows(stage, batch.rows)

    @staticmethod
    def _release_out(stage: Stage, slot: int | None) -> None:
        if slot is not None:
            stage.out_pool.release(slot)

    def _answer_exits(self, stage: Stage, batch: Batch, msg: dict) -> None:
        exited = msg["exited"]
        if not exited:
            return
        logits = np.frombuffer(msg["logits"], dtype=np.float32).reshape(len(exited), -1)
        exit_block = self.meta.exit_block(msg["exit"])
        for pos, row_logits in zip(exited, logits):
            self.on_answer(batch.rows[pos].sample, Result(int(row_logits.argmax()), row_logits.tolist(),
                                                          msg["exit"], exit_block, self.epoch))

    def _forward_survivors(self, stage: Stage, batch: Batch, out_slot: int | None, survivors: list[int],
                           now: float) -> None:
        if out_slot is None:
            return
        pool = stage.out_pool
        if survivors:
            pool.hold(out_slot, len(survivors))
            self.stages[stage.index + 1].queue.push(
                Row(batch.rows[p].sample, out_slot, j, now) for j, p in enumerate(survivors))
        pool.release(out_slot)      # the reservation taken for this copy

    def _count(self, stage: Stage, batch: Batch, msg: dict) -> None:
        self.stats.entered[stage.index] += len(batch.rows)
        self.stats.busy_s[stage.index] += msg["compute_s"]
        self.stats.batches[stage.index] += 1
        if msg["exit"] is not None:
            self.stats.exits[msg["exit"]] += len(msg["exited"])
        if batch.observe:
            self.stats.observed_entered[stage.index] += len(batch.rows)
            for k, n in msg["observed"].items():
                self.stats.observed[int(k)] += n

    def _fail_batch(self, stage: Stage, batch: Batch, exc: BaseException) -> None:
        for row in batch.rows:
            self.on_answer(row.sample, exc)
        self._settle(stage, batch)

    def _release_rows(self, stage: Stage, rows: list[Row]) -> None:
        for row in rows:
            if row.slot is not None:
                stage.in_pool.release(row.slot)

    def close(self) -> None:
        for pool in self.pools:
            pool.ring.close()
