"""Measurements turned into the cost model's overheads (planner/calibration.py), by hand."""
import pytest

from e3.planner.calibration import (BatchTiming, ComputeFit, NodeCpuFit, blend, compute_scale_sample, machine_cpu_s,
                                    node_seconds_per_request, others_share, per_batch_costs, process_cpu_s, shares_cores,
                                    split_compute_rows)
from e3.planner.cost_model import Overheads, entry_rows
from e3.planner.problem import DeviceType, Problem
from e3.planner.profiles import DeviceProfile

MS = 1e-3
BATCHES = [1, 2, 4, 8]


def problem(overheads=None):
    """Every block takes 0.5 ms + 0.25 ms per row; ramps, head and moves are free."""
    block = [(0.5 + 0.25 * b) * MS for b in BATCHES]
    prof = DeviceProfile("cpu", BATCHES, [block] * 4, [[0.0] * 4] * 3, [0.0] * 4)
    return Problem(4, [0, 1, 2], [0.5] * 3, [100] * 4, [DeviceType("cpu", 1, 0.0, prof)], batch_sizes=BATCHES,
                   overheads=overheads or Overheads()).validate()


def test_per_batch_cost_is_what_the_round_trip_adds_to_the_profile():
    timings = [BatchTiming(0, 0, 4, (1.5 + 2.0) * MS), BatchTiming(1, 3, 2, (3 * 1.0 + 2.5) * MS)]
    assert per_batch_costs(problem(), timings) == pytest.approx([2.0 * MS, 2.5 * MS])


def test_the_current_per_batch_estimate_is_not_subtracted_from_its_own_measurement():
    timings = [BatchTiming(0, 0, 4, (1.5 + 2.0) * MS)]
    assert per_batch_costs(problem(Overheads(per_batch_s=5 * MS)), timings) == pytest.approx([2.0 * MS])


def test_the_workers_fixed_part_is_taken_out_of_the_round_trip_with_the_scaled_compute():
    """A round trip holds the worker's whole compute: its scaled profile and its fixed part per batch;
    what is left is the dispatch."""
    timings = [BatchTiming(0, 0, 4, (2 * 1.5 + 0.8 + 2.0) * MS)]
    ov = Overheads(per_batch_s=5 * MS, compute_scale=2.0, worker_s_per_batch=0.8 * MS)
    assert per_batch_costs(problem(ov), timings) == pytest.approx([2.0 * MS])


def test_the_compute_fit_tells_a_fixed_part_per_batch_from_the_scale():
    """Splits of 1 block and of 3 blocks, each batch measured at 1.3x its profile + 0.8 ms: one ratio
    says 1.3-1.9 depending on the split; the fit says 1.3 and 0.8 ms whatever the plan."""
    p = problem()
    fit = ComputeFit()
    prof = p.devices[0].profile
    for rows in (2, 3, 4):
        one = 10 * float(prof.blocks_at(rows)[0])
        three = 10 * float(prof.blocks_at(rows)[1:4].sum())
        fit.add(split_compute_rows(p, [[0, 0], [1, 3]], [1.3 * one + 10 * 0.8 * MS, 1.3 * three + 10 * 0.8 * MS],
                                   [10, 10], [10 * rows, 10 * rows]))
    got = fit.fit()
    assert got.scale == pytest.approx(1.3, rel=1e-6) and got.fixed_s == pytest.approx(0.8 * MS, rel=1e-6)


def test_the_compute_fit_waits_until_the_splits_differ_enough():
    p = problem()
    fit = ComputeFit()
    for _ in range(5):                            # one split at one row count: the terms are one column
        fit.add(split_compute_rows(p, [[0, 3]], [12 * MS], [10], [40]))
    assert fit.fit() is None
    fit.add(split_compute_rows(p, [[0, 0]], [1 * MS], [3], [3]))     # too few batches to count
    assert fit.fit() is None


def test_blend_moves_part_way_and_never_below_zero():
    assert blend(1 * MS, [3 * MS, 2 * MS, 9 * MS]) == pytest.approx(0.7 * MS + 0.3 * 3 * MS)
    assert blend(1 * MS, []) == 1 * MS
    assert blend(0.1 * MS, [-5 * MS]) == 0.0


def test_node_time_per_request_needs_enough_requests():
    assert node_seconds_per_request(0.3, 600) == pytest.approx(0.5 * MS)
    assert node_seconds_per_request(0.3, 20) is None, "an idle interval's CPU is the loop's own, not per request"


def test_the_node_shares_cores_when_the_workers_take_them_all():
    assert shares_cores(2, 2, inline=False) and not shares_cores(4, 2, inline=False)
    assert shares_cores(16, 0, inline=True), "an inline engine runs in the node itself"


def test_survivors_of_one_batch_make_the_next_batch_when_work_conserving():
    wc = Overheads(work_conserving=True)
    assert entry_rows(wc, 8, 0.25, False) == 2.0
    assert entry_rows(wc, 8, 0.05, False) == 1.0, "a batch holds at least one row"
    assert entry_rows(wc, 8, 0.25, True) == 8.0, "the first split takes full batches"
    assert entry_rows(Overheads(), 8, 0.25, False) == 8.0, "deadline batching waits for B rows"


def test_the_compute_scale_is_measured_compute_over_the_profiles_at_the_rows_run():
    p = problem(Overheads(per_batch_s=5 * MS, compute_scale=3.0))      # the scale in force is not reused
    prof = p.devices[0].profile
    # 10 batches of 4 rows through split [0, 0] and 5 of 2 rows through [1, 1], 1.5x their profile
    expect = 10 * (prof.blocks_at(4)[0] + prof.ramp(0, 4)) + 5 * (prof.blocks_at(2)[1] + prof.ramp(1, 2))
    got = compute_scale_sample(p, [[0, 0], [1, 1]], [1.5 * expect], [10, 5], [40, 10])
    assert got == pytest.approx(1.5)
    assert compute_scale_sample(p, [[0, 1]], [1.0], [3], [12]) is None      # too few batches to tell


def test_other_processes_share_of_the_machine():
    # 2 cores for 1 s: the machine used 1.5 CPU-s, our processes 1.1 of them
    assert others_share(1.5, 1.1, 1.0, 2) == pytest.approx(0.2)
    assert others_share(1.0, 1.2, 1.0, 2) == 0.0          # clock ticks round: never below nothing


def test_machine_and_process_cpu_seconds_count_real_work():
    import os
    import time
    m0, p0 = machine_cpu_s(), process_cpu_s(os.getpid())
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    assert machine_cpu_s() - m0 >= 0.15 and process_cpu_s(os.getpid()) - p0 >= 0.15


def _intervals(fixed, per_request, per_batch, load):
    """(wall, requests, batches, cpu) per 5 s interval at (rate, rows per batch) pairs."""
    return [(5.0, int(5 * rate), int(5 * rate / rows), 5 * fixed + 5 * rate * per_request + 5 * rate / rows * per_batch)
            for rate, rows in load]


def test_the_node_fit_tells_the_cost_per_batch_from_the_cost_per_request():
    fit = NodeCpuFit()
    # light load: a batch per request; heavier: the batches fill (as a digits node's did)
    for row in _intervals(0.02, 0.4 * MS, 0.9 * MS, [(0, 1), (140, 1.1), (285, 1.6), (575, 2.8), (840, 4.0), (150, 1.0)]):
        fit.add(*row)
    got = fit.fit()
    assert got.fixed_cores == pytest.approx(0.02, abs=2e-3)
    assert got.s_per_request == pytest.approx(0.4 * MS, rel=0.05) and got.s_per_batch == pytest.approx(0.9 * MS, rel=0.05)


def test_the_node_fit_waits_until_the_intervals_tell_the_terms_apart():
    fit = NodeCpuFit()
    for row in _intervals(0.02, 0.4 * MS, 0.9 * MS, [(100, 2.0), (300, 2.0), (500, 2.0), (700, 2.0), (200, 2.0), (50, 2.0)]):
        fit.add(*row)
    assert fit.fit() is None, "rows per batch never changed: per request and per batch are one term"
    short = NodeCpuFit()
    for row in _intervals(0.02, 0.4 * MS, 0.9 * MS, [(140, 1.0), (840, 4.0)]):
        short.add(*row)
    assert short.fit() is None, "two intervals are too few to trust"


def test_no_term_of_the_node_fit_is_negative():
    fit = NodeCpuFit()
    # CPU that falls with load (noise, another process leaving): a free fit would give a negative slope
    for wall, n, m, cpu in [(5.0, 500, 500, 1.0), (5.0, 2500, 1000, 0.9), (5.0, 4000, 1000, 0.8),
                            (5.0, 700, 600, 1.0), (5.0, 3000, 800, 0.85), (5.0, 0, 0, 0.1)]:
        fit.add(wall, n, m, cpu)
    got = fit.fit()
    assert min(got.fixed_cores, got.s_per_request, got.s_per_batch) >= 0.0


def test_the_busiest_interval_says_how_many_rows_an_entry_batch_gathers():
    fit = NodeCpuFit()
    assert fit.busiest_entry_rows() is None
    for (wall, n, m, cpu), rows in zip(_intervals(0.02, 0.4 * MS, 0.9 * MS, [(140, 1.0), (840, 4.0), (300, 2.0)]),
                                       [1.0, 4.0, 2.0]):
        fit.add(wall, n, m, cpu, rows)
    fit.add(5.0, 0, 0, 0.1, None)                 # an idle interval ran no batch
    assert fit.busiest_entry_rows() == pytest.approx(4.0)


def test_the_loops_share_of_a_core_is_its_run_over_run_and_wait():
    from e3.planner.calibration import core_share, thread_schedstat
    assert core_share(0.6, 0.2) == pytest.approx(0.75)
    assert core_share(0.01, 0.5) is None, "a loop that hardly ran says nothing about its share"
    before = thread_schedstat()
    sum(i * i for i in range(300_000))
    after = thread_schedstat()
    assert after[0] > before[0] and after[1] >= before[1]
