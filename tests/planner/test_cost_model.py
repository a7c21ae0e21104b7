"""The one cost model with its queue (planner/cost_model.py) against hand-computed cases and the simulator."""
import pytest

from e3.planner.cost_model import Overheads, plan_queue, pool_node_share, value
from e3.planner.plan import Group, Plan
from e3.planner.problem import DeviceType, Link, Problem
from e3.planner.profiles import DeviceProfile
from e3.planner.simulator import find_goodput

from .test_queueing import md1_wait_cdf

BATCHES = [1, 2, 4, 8, 16]


def minilm_like(blocks=6):
    """6 blocks costing 2.5 ms + 0.45 ms per row on top of the first (about MiniLM's, 2 threads here),
    cheap ramps, a head that costs little."""
    block = [2.5e-3 + 0.45e-3 * (b - 1) for b in BATCHES]
    small = [0.2e-3 + 0.01e-3 * b for b in BATCHES]
    return DeviceProfile("cpu", BATCHES, [list(block) for _ in range(blocks)], [list(small)] * (blocks - 1),
                         list(small), 0.0, 0.0)


def problem(survival=(0.8, 0.6, 0.5, 0.45, 0.4), **over):
    ov = Overheads(per_batch_s=over.pop("per_batch_s", 0.3e-3), work_conserving=True, **over)
    return Problem(6, [0, 1, 2, 3, 4], list(survival), [1000] * 6, [DeviceType("cpu", 1, 0.0, minilm_like())],
                   slo_s=0.1, slack_s=0.0, batch_sizes=BATCHES, overheads=ov).validate()


def plan(batch, cuts=()):
    ends = list(cuts) + [5]
    splits = [[0 if i == 0 else ends[i - 1] + 1, e] for i, e in enumerate(ends)]
    return Plan(batch, splits, [Group("cpu", 1, list(range(len(splits))))], list(cuts), 0, 0, 0, [0.0] * len(splits))


def test_batch_one_stock_goodput_is_where_erlangs_md1_misses_one_percent():
    """Hand-computed: the stock model at batch 1 is an M/D/1 queue of D = 6 blocks + head + per batch;
    its goodput is the rate at which P(W > 100 ms - D) = 1%, solved here from Erlang's formula."""
    p = problem()
    D = 6 * 2.5e-3 + 0.21e-3 + 0.3e-3
    lo, hi = 1.0, 1 / D
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - md1_wait_cdf(mid, D, 0.1 - D) <= 0.01 else (lo, mid)
    v = value(p, plan(1))
    assert v.goodput == pytest.approx(lo, rel=0.03)
    assert v.goodput < 0.75 / D                      # far under capacity: the queue binds, not the device
    assert v.binding.startswith("the queue") and v.latency_s == pytest.approx(0.1, rel=0.02)


def test_the_queue_is_left_out_on_request_and_for_deadline_batching():
    p = problem()
    bare = value(p, plan(8, [1]), queue=False)
    assert bare.queue_rate is None and bare.latency_s == pytest.approx(sum(c.worst_s for c in bare.splits))
    p.overheads.work_conserving = False
    assert value(p, plan(8, [1])).queue_rate is None


def test_an_entry_batch_costs_its_survivors_work_and_its_deepest_row_rides_every_split():
    """Batch 4 cut after block 1 (survival 0.6 past it): an entry batch of n rows costs split 0 at n
    rows plus, with probability min(1, 0.6 n), split 1 at max(1, 0.6 n) rows; its path is both."""
    p = problem()
    q = plan_queue(p, plan(4, [1]))
    blk = lambda rows: 2.5e-3 + 0.45e-3 * (rows - 1)
    ramp = lambda rows: 0.2e-3 + 0.01e-3 * rows
    s0 = lambda n: 2 * blk(n) + ramp(n) + 0.3e-3
    s1 = lambda r: 4 * blk(r) + ramp(r) + 0.3e-3
    for n in (1, 2, 4):
        r = max(1.0, 0.6 * n)
        assert q.work_s[n - 1] == pytest.approx(s0(n) + min(1.0, 0.6 * n) * s1(r))
        assert q.path_s[n - 1] == pytest.approx(s0(n) + s1(r))


@pytest.mark.parametrize("batch,cuts", [(1, ()), (4, ()), (8, ()), (8, (1,)), (4, (0, 2))])
def test_predicted_goodput_is_within_15_percent_of_the_simulated(batch, cuts):
    """The simulator replays the runtime's dispatch (work-conserving admission, rebatchers, the pump's
    downstream-first order, per-batch and node costs) request by request."""
    p = problem(node_s_per_request=0.2e-3, node_shares_cores=True)
    pl = plan(batch, cuts)
    v = value(p, pl)
    pl.goodput = v.goodput
    sim = find_goodput(p, pl, duration_s=40.0, steps=14, seed=1)
    assert v.goodput == pytest.approx(sim.goodput, rel=0.15), (v.goodput, sim.goodput)


def two_pools(second_host="local", node_s=0.4e-3):
    """Split 0 (blocks 0-1) on device a, split 1 (blocks 2-5) on device b, one of each; the node's
    CPU shares the workers' cores."""
    ov = Overheads(per_batch_s=0.3e-3, work_conserving=True, node_s_per_request=node_s, node_shares_cores=True)
    link = None if second_host == "local" else Link(0.1e-3, 0.0)
    devices = [DeviceType("a", 1, 0.0, minilm_like()), DeviceType("b", 1, 0.0, minilm_like(), second_host, link)]
    p = Problem(6, [0, 1, 2, 3, 4], [0.8, 0.6, 0.5, 0.45, 0.4], [1000] * 6, devices, slo_s=0.1, slack_s=0.0,
                batch_sizes=BATCHES, overheads=ov).validate()
    pl = Plan(8, [[0, 1], [2, 5]], [Group("a", 1, [0]), Group("b", 1, [1])], [1], 0, 0, 0, [0.0, 0.0])
    return p, pl


def test_two_pools_on_the_nodes_host_share_its_cpu_between_them():
    """Hand-computed: the node's 0.4 ms per request is spread over the host's 2 devices, so each
    one-device pool gives up 0.2 ms per request (not the whole 0.4 ms each, as if the node ran twice);
    a pool on another host gives up none, and the one device left on the node's host all of it."""
    p, pl = two_pools()
    v = value(p, pl, queue=False)
    assert [pool.node_share_s for pool in v.pools] == pytest.approx([0.2e-3, 0.2e-3])
    for pool in v.pools:
        assert pool.capacity == pytest.approx(p.utilisation / (pool.work_s_per_request + 0.2e-3))
    assert pool_node_share(p, "a", 1) == pytest.approx(0.2e-3)
    remote, pl = two_pools(second_host="10.0.0.2")
    v = value(remote, pl, queue=False)
    assert [pool.node_share_s for pool in v.pools] == pytest.approx([0.4e-3, 0.0])


def test_a_pool_behind_another_pool_runs_full_batches():
    """Hand-computed: split 1 (blocks 2-5, 60% of requests enter) is the first split of pool b, so at
    b's capacity its rebatcher fills batches of 8: 4 blocks + head at 8 rows and the per-batch cost
    (moving rows is free in this profile), over 8 rows, times 0.6."""
    p, pl = two_pools(node_s=0.0)
    v = value(p, pl, queue=False)
    blk8, head8 = 2.5e-3 + 0.45e-3 * 7, 0.2e-3 + 0.01e-3 * 8
    assert v.splits[1].rows == 8.0
    assert v.pools[1].work_s_per_request == pytest.approx(0.6 * (4 * blk8 + head8 + 0.3e-3) / 8)


def test_two_local_pools_predicted_within_15_percent_of_the_simulated():
    """Each pool's share of the node is charged where its rows enter it, in the simulator as in the model."""
    from e3.planner.simulator import find_goodput
    p, pl = two_pools(node_s=1.0e-3)
    v = value(p, pl)
    pl.goodput = v.goodput
    sim = find_goodput(p, pl, duration_s=40.0, steps=14, seed=1)
    assert v.goodput == pytest.approx(sim.goodput, rel=0.15), (v.goodput, sim.goodput)


def test_batching_lifts_the_queue_limited_goodput_and_the_stock_baseline_takes_the_best_batch():
    from e3.planner.baselines import best_stock_plan
    p = problem()
    by_batch = {b: value(p, plan(b)).goodput for b in BATCHES}
    assert by_batch[4] > 2 * by_batch[1]
    assert best_stock_plan(p).batch == max(by_batch, key=by_batch.get)


def test_a_loop_that_gets_part_of_a_core_carries_that_part_of_the_rate():
    from e3.planner.cost_model import node_capacity
    whole = problem(node_s_per_request=0.5e-3)
    half = problem(node_s_per_request=0.5e-3, node_core_share=0.5)
    assert node_capacity(half) == pytest.approx(node_capacity(whole) / 2)
    assert half.overheads.node_wall_s == pytest.approx(1e-3)
    pl = plan(8, ())
    assert value(half, pl).goodput <= value(whole, pl).goodput
    assert value(half, pl, rate=100.0).latency_s > value(whole, pl, rate=100.0).latency_s


def test_every_splits_batches_load_the_nodes_loop():
    """On a node-bound model the EE model as is (a split per ramp, none rebatched) loses to the stock
    model because each split's batches cost the loop (bench/results/goodput_cpu-digits-8020_*.md:
    ee-batch 1,221 req/s, stock 1,374-1,545)."""
    from e3.planner.cost_model import node_batches_per_request, node_capacity
    p = problem(node_s_per_request=0.4e-3, node_s_per_batch=1.0e-3, node_entry_rows=4.0)
    stock, split = plan(8, ()), plan(8, (0, 1, 2, 3, 4))
    assert node_batches_per_request(p, stock) == pytest.approx(1 / 4)
    # later splits run the survivors of one entry batch: s / (4 s) each, so a batch per 4 entries each
    assert node_batches_per_request(p, split) == pytest.approx(6 / 4)
    assert node_capacity(p, split) < node_capacity(p, stock) < node_capacity(p)
    assert node_capacity(p, stock) == pytest.approx(p.utilisation / (0.4e-3 + 1.0e-3 / 4))
    assert value(p, split).node_capacity == pytest.approx(node_capacity(p, split))
    full = problem(node_s_per_request=0.4e-3, node_s_per_batch=1.0e-3)          # unmeasured: full batches
    assert node_batches_per_request(full, stock) == pytest.approx(1 / 8)
