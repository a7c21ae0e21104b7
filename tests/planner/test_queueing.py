"""The queue model (planner/queueing.py) against exact M/D/1 results and a direct simulation of the same queue."""
import math

import numpy as np
import pytest

from e3.planner.queueing import _SPARSE_FROM, BulkQueue, _Chain


def md1_wait_cdf(rate: float, service: float, t: float) -> float:
    """Erlang's exact waiting-time distribution of the M/D/1 queue, P(W <= t)."""
    rho = rate * service
    total = 0.0
    for k in range(int(math.floor(t / service)) + 1):
        x = rate * (k * service - t)
        total += x ** k / math.factorial(k) * math.exp(-x)
    return (1 - rho) * total


def simulate(q: BulkQueue, rate: float, deadline: float, n: int = 60000, seed: int = 3) -> float:
    """Share of late answers in a direct event-by-event run of the queue the model describes
    (one device: a free device takes up to B waiting requests; each answered path_s after its batch starts)."""
    assert q.servers == 1
    t = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))
    path, work = np.asarray(q.path_s), np.asarray(q.work_s)
    free, i, late = 0.0, 0, 0
    while i < n:
        start = max(free, t[i])
        j = min(int(np.searchsorted(t, start, "right")), i + q.batch)
        late += int(np.count_nonzero(start + path[j - i - 1] - t[i:j] > deadline))
        free, i = start + work[j - i - 1], j
    return late / n


def linear(batch: int, t1: float, tb: float) -> tuple[float, ...]:
    return tuple(t1 + (tb - t1) * (n - 1) / max(batch - 1, 1) for n in range(1, batch + 1))


@pytest.mark.parametrize("load", [0.3, 0.6, 0.85])
def test_batch_one_is_the_md1_queue(load):
    service, deadline = 0.02, 0.09
    q = BulkQueue(1, 1, (service,), (service,))
    rate = load / service
    exact = 1 - md1_wait_cdf(rate, service, deadline - service)
    assert q.miss_share(rate, deadline) == pytest.approx(exact, abs=0.01 + 0.05 * exact)


@pytest.mark.parametrize("batch,t1,tb", [(4, 0.025, 0.05), (8, 0.012, 0.04), (32, 0.004, 0.03)])
def test_bulk_queue_matches_a_simulation_of_it(batch, t1, tb):
    times = linear(batch, t1, tb)
    q = BulkQueue(batch, 1, times, times)
    for load in (0.5, 0.8, 0.95):
        rate = q.stable_rate() * load
        model, sim = q.miss_share(rate, 0.09), simulate(q, rate, 0.09)
        assert model == pytest.approx(sim, abs=0.01 + 0.25 * sim), (load, model, sim)


def test_max_rate_lands_where_the_simulation_misses_one_percent():
    times = linear(8, 0.012, 0.04)
    q = BulkQueue(8, 1, times, times)
    rate = q.max_rate(0.09, 0.01)
    assert simulate(q, rate * 0.9, 0.09) <= 0.01 < simulate(q, rate * 1.1, 0.09)


def test_batch_one_saturates_far_below_capacity_and_batching_lifts_it():
    one = BulkQueue(1, 1, (0.025,), (0.025,))
    assert one.max_rate(0.09, 0.01) < 0.5 * one.stable_rate()        # the M/D/1 knee, not capacity
    four = BulkQueue(4, 1, linear(4, 0.025, 0.05), linear(4, 0.025, 0.05))
    assert four.max_rate(0.09, 0.01) > 2 * one.max_rate(0.09, 0.01)


def test_misses_grow_with_the_rate_and_a_deadline_below_one_batch_misses_all():
    q = BulkQueue(4, 1, linear(4, 0.01, 0.03), linear(4, 0.01, 0.03))
    shares = [q.miss_share(r, 0.06) for r in np.linspace(10, q.stable_rate() * 0.99, 12)]
    assert all(a <= b + 1e-9 for a, b in zip(shares, shares[1:]))
    assert q.miss_share(1.0, 0.005) == 1.0 and q.max_rate(0.005, 0.01) == 0.0


def test_latency_quantile_is_the_deadline_that_misses_the_share():
    q = BulkQueue(4, 1, linear(4, 0.01, 0.03), linear(4, 0.01, 0.03))
    rate = q.stable_rate() * 0.7
    p99 = q.latency_quantile(rate, 0.99, 1.0)
    assert q.miss_share(rate, p99 * 1.01) <= 0.01 < q.miss_share(rate, p99 * 0.97)


def test_a_large_chain_solved_sparse_agrees_with_the_dense_solve():
    q = BulkQueue(16, 1, linear(16, 0.0008, 0.004), linear(16, 0.0008, 0.004))
    chain = _Chain(q, q.stable_rate() * 0.8, 0.2)
    assert chain.N + 1 >= _SPARSE_FROM
    dense = np.linalg.solve(chain._balance_dense(), np.eye(chain.N + 1)[-1])
    assert np.abs(chain.pi - dense / dense.sum()).max() < 1e-10
    assert chain.pi[:40].sum() > 0.5                         # a real distribution, not a flat one


def test_a_path_that_does_not_grow_with_the_rows_is_searched_exactly():
    """Position a rides min(B, a + 1 + joins) rows: the most positions that pass, tried one by one,
    equal the model's one search, also when a measured path dips at some batch size."""
    path = (0.010, 0.014, 0.013, 0.020, 0.018, 0.026, 0.025, 0.031)
    q = BulkQueue(8, 1, path, path)
    chain = _Chain(q, q.stable_rate() * 0.6, 0.1)
    residual = np.linspace(0.0, 0.04, 200)[:, None] * np.ones((1, 3))
    joins = np.floor(np.linspace(0, 9, 600)).reshape(200, 3)
    for t in (0.02, 0.035, 0.05, 0.07):
        tried = np.full(residual.shape, -1)
        for a in range(7, -1, -1):
            ok = residual + np.asarray(path)[np.minimum(8, a + 1 + joins).astype(int) - 1] <= t
            tried = np.where((tried < 0) & ok, a, tried)
        assert np.array_equal(chain._next_batch_most(residual, joins, t), tried), t
    for load in (0.5, 0.9):
        rate = q.stable_rate() * load
        model, sim = q.miss_share(rate, 0.06), simulate(q, rate, 0.06)
        assert model == pytest.approx(sim, abs=0.01 + 0.25 * sim), (load, model, sim)


def test_bad_queues_are_refused():
    with pytest.raises(ValueError, match="batch 2"):
        BulkQueue(2, 1, (0.01,), (0.01, 0.02))
    with pytest.raises(ValueError, match="finite and positive"):
        BulkQueue(1, 1, (0.0,), (0.01,))
