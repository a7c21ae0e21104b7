"""The runtime with the in-process engine: same pipeline, no subprocesses.

The worker-process mode runs the same Pipeline and WorkerEngine; it is tested
end to end in tests/e2e. Here the model is the small double-precision MLP so
that every answer can be compared exactly with the per-sample reference.
"""
import asyncio
import random
from pathlib import Path

import pytest
import torch

from e3.models.executor import reference_forward, splits_from_cuts
from e3.models.policies import make_policy
from e3.models.registry import LoadedModel
from e3.runtime.batcher import Sample
from e3.runtime.config import E3Config
from e3.runtime.errors import ConfigError, DeadlineExceededError, NotReadyError, OverloadedError
from e3.runtime.pipeline import Placement
from e3.runtime.runtime import Runtime
from e3.runtime.worker_client import WorkerClient
from e3.runtime.worker_pool import LocalWorkerPool
from tests.support.mlp import WIDTH, MLPModel

INPUTS = [t.tolist() for t in torch.randn(300, WIDTH, generator=torch.Generator().manual_seed(3),
                                          dtype=torch.float64)]


def config(batch=8, cuts=(1, 3), workers=2, **batching):
    """Generous deadlines by default: these tests check answers, not speed, and
    must pass on a loaded 2-core machine (the deadline tests set their own)."""
    c = E3Config()
    c.model.path = "digits"
    c.workers.mode, c.workers.cpu_workers = "inline", workers
    c.batching.batch, c.batching.cuts = batch, list(cuts)
    c.batching.slo_ms, c.batching.timeout_ms = 500, 30000
    for k, v in batching.items():
        setattr(c.batching, k, v)
    if "max_queue_delay_ms" not in batching:   # bursts queue up; the overload tests set their own limit
        c.batching.max_queue_delay_ms = c.batching.timeout_ms
    c.server.max_inputs = min(c.server.max_inputs, c.batching.max_queue)
    return c


def runtime(cfg, policy=("patience", 2)):
    # Inline mode: one engine per worker, so give it its own policy object too.
    return Runtime(cfg, model=LoadedModel(MLPModel(), make_policy(*policy), Path(".")))


def reference(policy, cuts):
    model = MLPModel()
    enabled = [model.meta.ramp_at(c) for c in cuts]
    xs = [torch.tensor(x, dtype=torch.float64) for x in INPUTS]
    return [(a.label, a.exit_point) for a in reference_forward(model, make_policy(*policy), xs, enabled)]


@pytest.mark.parametrize("policy", [("patience", 2), ("entropy", 0.35), ("maxprob", 0.8)])
@pytest.mark.parametrize("cuts,batch", [((), 8), ((1, 3), 8), ((0, 1, 2, 3, 4), 5)])
async def test_answers_equal_the_reference(policy, cuts, batch):
    async with runtime(config(batch, cuts), policy) as rt:
        results = await asyncio.gather(*(rt.infer([x]) for x in INPUTS))
    assert [(r[0].label, r[0].exit_point) for r in results] == reference(policy, cuts)


async def test_a_request_with_many_inputs_keeps_their_order():
    async with runtime(config()) as rt:
        results = await rt.infer(INPUTS[:50])
    assert [(r.label, r.exit_point) for r in results] == reference(("patience", 2), (1, 3))[:50]


async def test_batches_keep_the_plan_size_under_load():
    """Under a backlog every split's entry sees full batches, although
    survivors shrink at each ramp: the rebatchers merge them. Deadline batching: with
    work-conserving dispatch (the default) a worker that goes idle for an instant takes a
    partial batch of survivors at once, so how many do depends on timing (this test was flaky)."""
    async with runtime(config(batch=8, cuts=(0, 1, 2, 3, 4), slo_ms=3000, work_conserving=False),
                       ("entropy", 0.35)) as rt:
        pipeline = rt.pipelines[rt.epoch]
        await asyncio.gather(*(rt.infer([x]) for x in INPUTS * 2))
        rows = pipeline.stats.batch_rows
    assert all(n <= 8 for stage in rows for n in stage)
    for stage in rows:
        # Only the tail, once the load stops, flushes partial batches (deadline):
        # without rebatching, survivors would run in batches of 2-5 rows.
        if sum(stage) >= 40:
            in_full = sum(n for n in stage if n == 8) / sum(stage)
            assert in_full >= 0.85, f"only {in_full:.0%} of rows ran in full batches: {stage}"
    assert len(rows[0]) >= 70 and len(rows[-1]) < len(rows[0])


@pytest.mark.parametrize("work_conserving", [True, False])
async def test_an_idle_worker_takes_a_partial_batch_at_once_only_when_work_conserving(work_conserving):
    """Holding rows in front of an idle worker buys only latency; without work conservation a
    lone input waits at every split until its deadline forces the flush (2 s SLO here)."""
    slo_s = 2.0
    async with runtime(config(batch=64, slo_ms=slo_s * 1000, timeout_ms=30000,
                              work_conserving=work_conserving)) as rt:
        loop = asyncio.get_running_loop()
        start = loop.time()
        [result] = await rt.infer([INPUTS[0]])
        elapsed = loop.time() - start
    assert (result.label, result.exit_point) == reference(("patience", 2), (1, 3))[0]
    if work_conserving:
        assert elapsed < slo_s / 2, f"an idle worker should have taken the lone input at once ({elapsed:.2f} s)"
    else:
        assert elapsed >= slo_s / 2, f"the input should have waited for its deadline ({elapsed:.2f} s)"


async def test_without_rebatching_survivors_run_as_shrunken_batches():
    """batching.rebatch = False (the ee-batch baseline): same answers, but no split
    after the first waits to merge survivors, so its batches are mostly partial."""
    cuts = (0, 1, 2, 3, 4)
    async with runtime(config(batch=8, cuts=cuts, slo_ms=3000, rebatch=False), ("entropy", 0.35)) as rt:
        pipeline = rt.pipelines[rt.epoch]
        results = await asyncio.gather(*(rt.infer([x]) for x in INPUTS))
        rows = pipeline.stats.batch_rows
    assert [(r[0].label, r[0].exit_point) for r in results] == reference(("entropy", 0.35), cuts)
    later = [n for stage in rows[1:] for n in stage]
    assert later and sum(n < 8 for n in later) / len(later) >= 0.5, rows


async def test_a_lone_input_is_flushed_partial_before_its_slo():
    async with runtime(config(batch=64, slo_ms=80, timeout_ms=1000, work_conserving=False)) as rt:
        loop = asyncio.get_running_loop()
        start = loop.time()
        [result] = await rt.infer([INPUTS[0]])
        elapsed = loop.time() - start
    assert result.exit_point == reference(("patience", 2), (1, 3))[0][1]
    assert elapsed < 0.5, f"a partial batch should flush near the 80 ms SLO, took {elapsed:.3f} s"


async def test_overload_is_refused_not_buffered():
    async with runtime(config(batch=4, max_queue=16)) as rt:
        outcomes = await asyncio.gather(*(rt.infer([x]) for x in INPUTS[:200]), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, OverloadedError)]
    answered = [o for o in outcomes if isinstance(o, list)]
    assert refused and answered
    assert len(refused) + len(answered) == 200


async def test_a_queue_that_falls_behind_refuses_newcomers_then_recovers():
    """Rows held for their deadline flush (batch 64 never fills): after 50 ms of waiting the
    queue is 'behind', so a newcomer is refused at once; the held rows are still answered."""
    cfg = config(batch=64, slo_ms=400, work_conserving=False, max_queue_delay_ms=50)
    async with runtime(cfg) as rt:
        held = asyncio.ensure_future(rt.infer(INPUTS[:2]))
        await asyncio.sleep(0.1)
        with pytest.raises(OverloadedError, match="admission queue is .* ms behind .limit 50 ms"):
            await rt.infer(INPUTS[2:3])
        assert len(await held) == 2
        assert len(await rt.infer(INPUTS[2:3])) == 1


async def test_hot_swap_under_load_loses_and_duplicates_nothing():
    plans = [((1, 3), 8), ((), 4), ((0, 1, 2, 3, 4), 6), ((2,), 16), ((1, 3), 3)]
    refs = {cuts: reference(("patience", 2), cuts) for cuts, _ in plans}
    rng = random.Random(0)
    async with runtime(config(*plans[0][::-1], slo_ms=200)) as rt:
        by_epoch = {0: plans[0][0]}

        async def swapper():
            for i in range(12):
                cuts, batch = plans[(i + 1) % len(plans)]
                splits = splits_from_cuts(rt.meta, cuts)
                placement = Placement(batch, tuple((s.first, s.last) for s in splits),
                                      tuple(tuple(rt.workers) for _ in splits))
                epoch = await rt.apply(placement)
                by_epoch[epoch] = cuts
                await asyncio.sleep(0.01)

        async def client(i):
            await asyncio.sleep(rng.random() * 0.2)
            return i, await rt.infer([INPUTS[i]])

        results, _ = await asyncio.gather(asyncio.gather(*(client(i) for i in range(len(INPUTS)))), swapper())
        assert len(rt.pipelines) == 1, "drained epochs must retire"
        assert dropped(rt) == {}, "no input may get a second answer"
    epochs = {r[0].epoch for _, r in results}
    assert len(epochs) >= 3, f"the load should span several epochs, saw {epochs}"
    for i, [r] in results:
        assert (r.label, r.exit_point) == refs[by_epoch[r.epoch]][i]


def dropped(rt) -> dict[str, float]:
    """e3_answers_dropped_total by reason, as /metrics shows it."""
    return {s.labels["why"]: s.value for m in rt.metrics.registry.collect()
            if m.name == "e3_answers_dropped" for s in m.samples if s.name.endswith("_total")}


async def test_a_second_answer_is_dropped_and_counted():
    """Exactly-once delivery is checked, not assumed: the runtime counts what it drops."""
    async with runtime(config()) as rt:
        [result] = await rt.infer([INPUTS[0]])
        loop = asyncio.get_running_loop()
        answered, timed_out = (Sample(i, loop.create_future(), 0.0, 1.0, 2.0) for i in (10**6, 10**6 + 1))
        rt._on_answer(answered, result)
        rt._on_answer(answered, result)
        rt._on_answer(timed_out, DeadlineExceededError("too late"))
        rt._on_answer(timed_out, result)
        assert answered.future.result() is result and dropped(rt) == {"duplicate": 1.0, "late": 1.0}


async def test_queue_time_and_refusals_are_counted_per_input():
    async with runtime(config(batch=4, max_queue=16)) as rt:
        outcomes = await asyncio.gather(*(rt.infer(INPUTS[i:i + 2]) for i in range(0, 200, 2)),
                                        return_exceptions=True)
        refused = 2 * sum(isinstance(o, OverloadedError) for o in outcomes)
        get = rt.metrics.registry.get_sample_value
        assert refused and get("e3_inputs_total", {"outcome": "rejected"}) == refused
        assert get("e3_failures_total", {"reason": "OverloadedError"}) == refused
        waited = sum(get("e3_queue_seconds_count", {"split": str(i)}) or 0 for i in range(3))
        entered = sum(get("e3_batch_rows_sum", {"split": str(i)}) or 0 for i in range(3))
        assert waited >= 200 - refused and waited == entered


async def test_threshold_changes_at_run_time():
    async with runtime(config(cuts=(0, 1, 2, 3, 4)), ("maxprob", 0.99)) as rt:
        strict = await rt.infer(INPUTS[:60])
        await rt.set_policy("maxprob", 0.5)
        loose = await rt.infer(INPUTS[:60])
    mean = lambda rs: sum(r.exit_point for r in rs) / len(rs)
    assert mean(loose) < mean(strict)


def test_fixed_cuts_and_a_planner_conflict():
    from e3.runtime.planner_actor import planner_factory
    with pytest.raises(ConfigError, match=r"batching.cuts \[1, 3\] fixes the splits, but a planner"):
        Runtime(config(), model=LoadedModel(MLPModel(), make_policy("patience", 2), Path(".")),
                planner_factory=planner_factory)


def test_a_model_object_needs_inline_workers():
    cfg = E3Config()
    cfg.model.path = "digits"
    with pytest.raises(ConfigError, match="inline"):
        Runtime(cfg, model=LoadedModel(MLPModel(), make_policy("entropy", 0.2), Path(".")))


async def test_close_drains_what_was_admitted_and_then_refuses():
    """The sidecar's shutdown: inputs already admitted are answered (their partial batches
    flush at once rather than at their 3 s deadline), then new ones are refused."""
    rt = runtime(config(batch=64, slo_ms=3000, work_conserving=False))
    await rt.start()
    loop = asyncio.get_running_loop()
    pending = [asyncio.ensure_future(rt.infer([x])) for x in INPUTS[:40]]
    await asyncio.sleep(0.05)
    assert not any(p.done() for p in pending), "a batch of 64 should still be filling"
    started = loop.time()
    await rt.close()
    assert loop.time() - started < 1.5
    results = [p.result()[0] for p in pending]
    assert [(r.label, r.exit_point) for r in results] == reference(("patience", 2), (1, 3))[:40]
    with pytest.raises(NotReadyError):
        await rt.infer([INPUTS[0]])


class StartsSlowly(WorkerClient):
    """Alive 0.2 s after start() is called; records whether each stop() found it alive."""

    def __init__(self, *args):
        super().__init__(*args)
        self.stops: list[bool] = []

    async def start(self):
        await asyncio.sleep(0.2)
        self.alive = True

    async def stop(self):
        self.stops.append(self.alive)
        self.alive = False

    def send(self, kind, **fields):
        pass


class CannotStart(StartsSlowly):
    async def start(self):
        raise NotReadyError("worker 1 cannot start")


async def test_a_failed_worker_start_waits_for_the_others_and_stops_them(monkeypatch):
    """Were start() to raise at the first failure, close() would find the slow worker not yet
    alive, skip it, and it would come up afterwards with nothing left to stop it."""
    cfg = config()
    cfg.workers.devices = ["cpu", "cpu"]
    rt = runtime(cfg)
    slow, broken = StartsSlowly(0, "cpu", None, None), CannotStart(1, "cpu", None, None)
    monkeypatch.setattr(LocalWorkerPool, "_make_worker", lambda pool, i, device: slow if i == 0 else broken)
    with pytest.raises(NotReadyError, match="worker 1 cannot start"):
        await rt.start()
    await rt.close()
    await asyncio.sleep(0.3)
    assert True in slow.stops and not slow.alive


async def test_a_policy_change_while_a_worker_restarts_reaches_it(monkeypatch):
    """The replacement worker takes its policy when it is made, then starts for a while outside
    the set of live workers that set_policy messages: a change made meanwhile must still reach it."""
    from e3.runtime.worker_client import InlineWorker
    async with runtime(config(cuts=(0, 1, 2, 3, 4)), ("maxprob", 0.99)) as rt:
        start = InlineWorker.start

        async def slow_start(self):
            await asyncio.sleep(0.3)       # a worker process loads its model for seconds
            await start(self)
        monkeypatch.setattr(InlineWorker, "start", slow_start)
        old = rt.workers[0]
        old.alive = False
        rt.pool._on_exit(old)              # what the socket reader does when a worker dies
        await old.stop()
        await asyncio.sleep(0.1)
        await rt.set_policy("maxprob", 0.5)
        for _ in range(100):
            if rt.metrics.registry.get_sample_value("e3_worker_events_total", {"event": "restarted"}):
                break
            await asyncio.sleep(0.02)
        new = rt.workers[0]
        assert new is not old and new.alive
        assert new.engine.policy.threshold == 0.5



async def test_a_worker_restarted_across_a_plan_swap_is_prepared_for_each_epoch_once(monkeypatch):
    """The pool registers a replacement before the Runtime prepares it: a swap while it starts
    must leave it prepared for the new epoch, and no epoch prepared twice."""
    from e3.runtime.wire import Kind
    from e3.runtime.worker_client import InlineWorker
    async with runtime(config(cuts=(1, 3))) as rt:
        prepares, start, send = [], InlineWorker.start, InlineWorker.send

        async def slow_start(self):
            await asyncio.sleep(0.3)       # a worker process loads its model for seconds
            await start(self)

        def recording_send(self, kind, **fields):
            if kind == Kind.PREPARE:
                prepares.append((self, fields["epoch"]))
            send(self, kind, **fields)
        monkeypatch.setattr(InlineWorker, "start", slow_start)
        monkeypatch.setattr(InlineWorker, "send", recording_send)
        old = rt.workers[0]
        old.alive = False
        rt.pool._on_exit(old)
        await old.stop()
        swapped = await rt.apply(rt.placement)      # while the replacement starts
        for _ in range(100):
            if rt.metrics.registry.get_sample_value("e3_worker_events_total", {"event": "restarted"}):
                break
            await asyncio.sleep(0.02)
        new = rt.workers[0]
        epochs = [e for w, e in prepares if w is new]
        assert new is not old and swapped in epochs and len(epochs) == len(set(epochs)), prepares
        assert new in rt.pipelines[rt.epoch].prepared
        assert len(await rt.infer(INPUTS[:20])) == 20
