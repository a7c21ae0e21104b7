"""runtime/overhead_meter.py: what the planner actor measures live, blended, and what stays pinned."""
import pytest

from e3.planner.calibration import BatchTiming
from e3.runtime.config import ReplanConfig
from e3.runtime.overhead_meter import OverheadMeter


def test_the_node_cpu_moves_30_percent_toward_an_intervals_ratio_until_the_terms_can_be_fitted():
    meter = OverheadMeter(ReplanConfig(node_ms_per_request=0.5))
    meter.node(wall_s=2.0, requests=200, batches=50, cpu_s=0.2, entry_rows=4.0)     # 1 ms a request
    assert meter.node_s == pytest.approx(0.7 * 0.5e-3 + 0.3 * 1e-3)
    assert meter.node_cpu_view() is None                    # one interval: no fit by term yet


def test_what_the_config_pins_stays_pinned():
    rc = ReplanConfig(dispatch_ms=2.0, node_ms_per_request=0.5, measure_dispatch=False, measure_node=False,
                      measure_compute=False)
    meter = OverheadMeter(rc)
    meter.batches(None, [BatchTiming(0, 0, 1, 1.0)] * 8)    # never read: the dispatch cost is pinned
    meter.compute(None, [[0, 0]], [1.0], [10], [10])
    meter.node(wall_s=2.0, requests=200, batches=50, cpu_s=0.2, entry_rows=4.0)
    ov = meter.overheads(shares_cores=True, work_conserving=True)
    assert (ov.per_batch_s, ov.node_s_per_request, ov.compute_scale) == (2e-3, 0.5e-3, 1.0)
    assert ov.node_shares_cores and ov.work_conserving


def test_the_meter_prices_a_fixed_part_per_batch_once_the_splits_tell_it_apart():
    """Scripted intervals of a 1-block and a 5-block split measured at 1.25x their profile plus 0.8 ms
    a batch: the scale heads for 1.25 (not the 1.4-1.7 of one ratio) and the fixed part for 0.8 ms,
    and the overheads the planner reads carry both."""
    from tests.planner.test_calibration import problem
    p = problem()
    prof = p.devices[0].profile
    meter = OverheadMeter(ReplanConfig())
    for _ in range(30):
        one, three = 10 * float(prof.blocks_at(2)[0]), 10 * float(prof.blocks_at(2)[1:4].sum())
        meter.compute(p, [[0, 0], [1, 3]], [1.25 * one + 8e-3, 1.25 * three + 8e-3], [10, 10], [20, 20])
    ov = meter.overheads(shares_cores=True, work_conserving=True)
    assert ov.compute_scale == pytest.approx(1.25, rel=1e-3) and ov.worker_s_per_batch == pytest.approx(0.8e-3, rel=1e-3)
    assert meter.compute_view() == {"scale": 1.25, "worker_ms_per_batch": 0.8}
