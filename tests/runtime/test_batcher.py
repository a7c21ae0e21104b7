"""The admission batcher / rebatcher queue, with time passed in (no sleeps)."""
import asyncio

import pytest

from e3.runtime.batcher import Row, RowQueue, Sample
from e3.runtime.errors import OverloadedError


def sample(loop, arrived, slo=0.1, timeout=1.0, rid=0):
    return Sample(rid, loop.create_future(), arrived, arrived + slo, arrived + timeout)


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def test_full_batch_is_due_at_once(loop):
    q = RowQueue(batch=4)
    q.push(Row(sample(loop, 0.0, rid=i)) for i in range(5))
    assert q.due(now=0.0, budget_s=0.01)
    assert [r.sample.rid for r in q.take()] == [0, 1, 2, 3]
    assert len(q) == 1


def test_partial_batch_waits_until_the_slo_needs_it(loop):
    q = RowQueue(batch=8)
    q.push([Row(sample(loop, 0.0, slo=0.1))])
    budget = 0.03                       # time the rest of the pipeline needs
    assert not q.due(now=0.05, budget_s=budget)
    assert q.flush_at(budget) == pytest.approx(0.07)
    assert q.due(now=0.07, budget_s=budget)
    assert len(q.take()) == 1


def test_flush_follows_the_earliest_slo_not_the_head(loop):
    """Survivors of several upstream batches arrive out of arrival order."""
    q = RowQueue(batch=8)
    q.push([Row(sample(loop, 0.02)), Row(sample(loop, 0.0))])
    assert q.flush_at(0.0) == pytest.approx(0.1)


def test_draining_flushes_anything(loop):
    q = RowQueue(batch=8)
    q.push([Row(sample(loop, 0.0))])
    q.draining = True
    assert q.due(now=0.0, budget_s=0.0)


def test_an_eager_queue_hands_out_a_partial_batch_at_once(loop):
    """The ee-batch baseline: survivors do not wait for others to fill a batch."""
    q = RowQueue(batch=8, eager=True)
    assert not q.due(now=0.0, budget_s=0.0)
    q.push([Row(sample(loop, 0.0)), Row(sample(loop, 0.0))])
    assert q.due(now=0.0, budget_s=0.0)
    assert len(q.take()) == 2


def test_work_conserving_queue_is_due_for_an_idle_worker_only(loop):
    q = RowQueue(batch=8, work_conserving=True)
    q.push([Row(sample(loop, 0.0))])
    assert not q.due(now=0.0, budget_s=0.0, worker_idle=False)
    assert q.due(now=0.0, budget_s=0.0, worker_idle=True)
    waits = RowQueue(batch=8)
    waits.push([Row(sample(loop, 0.0))])
    assert not waits.due(now=0.0, budget_s=0.0, worker_idle=True), "without it, only B rows or the SLO"


def test_bounded_admission_refuses_overflow(loop):
    q = RowQueue(batch=2, capacity=3)
    q.push(Row(sample(loop, 0.0)) for _ in range(3))
    with pytest.raises(OverloadedError, match="admission queue full .3 of 3"):
        q.push([Row(sample(loop, 0.0))])
    assert len(q) == 3


def test_admission_refuses_while_the_oldest_row_is_too_far_behind(loop):
    """A newcomer queues behind the oldest row: once a pump has left that row waiting (no
    free worker) past the limit, the newcomer would miss its SLO too, so it is refused now
    instead of answered late. Before any pump has seen the head, only the loop is behind
    (a burst being admitted), and nothing is refused."""
    def row(t):
        return Row(sample(loop, t), queued_at=t)
    q = RowQueue(batch=8, capacity=100, max_delay_s=0.1)
    q.push([row(0.0)], now=0.0)
    q.push([row(0.15)], now=0.15)
    q.looked_at = 0.01
    with pytest.raises(OverloadedError, match="admission queue is 200 ms behind .limit 100 ms"):
        q.push([row(0.2)], now=0.2)
    assert len(q) == 2
    q.take()
    q.push([row(0.2)], now=0.2)     # caught up: admitted again
    assert len(q) == 1


def test_expire_removes_late_and_answered_rows(loop):
    q = RowQueue(batch=8)
    late, answered, fine = sample(loop, 0.0, timeout=0.5), sample(loop, 0.4), sample(loop, 0.4)
    answered.answer("x")
    q.push([Row(late), Row(answered), Row(fine)])
    dead = q.expire(now=0.6)
    assert {id(r.sample) for r in dead} == {id(late), id(answered)}
    assert [r.sample for r in q.take()] == [fine]


def test_answer_is_given_once(loop):
    s = sample(loop, 0.0)
    assert s.answer(1)
    assert not s.answer(2) and not s.fail(RuntimeError("late"))
    assert s.future.result() == 1


def test_statistics_report_backlog(loop):
    q = RowQueue(batch=2, capacity=10)
    q.push([Row(sample(loop, 1.0)), Row(sample(loop, 1.5))])
    st = q.statistics(now=2.0)
    assert (st.rows, st.capacity, st.oldest_wait_s) == (2, 10, 1.0)


def test_stats_lists_stay_bounded_without_a_reader():
    from e3.runtime.pipeline import _bounded_append
    values = []
    for i in range(10_000):
        _bounded_append(values, i, keep=100)
    assert len(values) <= 200 and values[-1] == 9999
