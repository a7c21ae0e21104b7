"""The forecast process: a real child fitting real ARIMA models, talking JSON lines."""
import os
import signal

import numpy as np
import pytest

from e3.planner.forecast import Forecaster
from e3.runtime.errors import ForecastProcessError
from e3.runtime.forecast_process import ForecastProcess


def busy_forecaster() -> Forecaster:
    rng = np.random.default_rng(0)
    f = Forecaster(2, min_history=12)
    for t in range(40):
        a = float(np.clip(0.5 + 0.2 * (t > 25) + rng.normal(0, 0.03), 0, 1))
        f.observe([a, a / 2])
    return f


@pytest.fixture
async def fits():
    fp = ForecastProcess()
    await fp.start()
    yield fp
    await fp.close()


async def test_the_child_fits_what_the_node_would(fits):
    f = busy_forecaster()
    got = await fits.forecast(f)
    assert got.method == "arima" and got == f.forecast()


async def test_a_killed_child_fails_one_call_then_is_restarted(fits):
    f = busy_forecaster()
    fits._proc.kill()
    await fits._proc.wait()
    assert (await fits.forecast(f)) == f.forecast()     # seen dead before the call: restarted at once
    fits._proc.kill()                                   # dies unseen: the call fails, the next restarts
    outcomes = [await _try(fits, f) for _ in range(2)]
    assert outcomes[-1] == f.forecast(), outcomes


async def test_a_bad_state_is_answered_with_an_error_and_the_child_goes_on(fits):
    class Broken(Forecaster):
        def fit_state(self):
            return {**super().fit_state(), "series": [[0.5]]}     # 1 series for 2 ramps
    with pytest.raises(ForecastProcessError, match="the forecast process failed"):
        await fits.forecast(Broken(2))
    assert (await fits.forecast(busy_forecaster())).method == "arima"


async def _try(fits, f):
    try:
        return await fits.forecast(f)
    except ForecastProcessError as exc:
        return exc


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
async def test_the_child_runs_only_on_cpu_the_node_leaves(fits):
    assert os.sched_getscheduler(fits._proc.pid) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE          # the node itself is left as it was


async def test_the_terminals_sigint_is_left_to_the_node(fits, capfd):
    """Ctrl-C reaches the whole process group: the child must neither die nor print a
    traceback; it stops when the node closes its input, after the node has drained."""
    proc = fits._proc
    os.kill(proc.pid, signal.SIGINT)
    f = busy_forecaster()
    assert (await fits.forecast(f)) == f.forecast()
    assert fits._proc is proc
    await fits.close()
    assert proc.returncode == 0
    assert "Traceback" not in capfd.readouterr().err


async def test_the_child_solves_what_the_node_would(fits):
    """Re-solves with the queue run in the child too (they hold the GIL for 0.15-0.9 s); the plans,
    the baselines and the running plan's value cross as JSON and equal an in-process solve."""
    from e3.planner.cost_model import Overheads
    from e3.planner.options import options_for
    from tests.planner.test_dp import random_problem
    p = random_problem(7, types=1, max_blocks=5)
    p.overheads = Overheads(per_batch_s=0.3e-3, work_conserving=True)
    here = options_for(p, None)
    there = await fits.options(p, here.plans["stock"], with_solve=True)
    assert there.result.plan.to_json() == here.result.plan.to_json()
    assert {k: v and v.goodput for k, v in there.plans.items()} == {k: v and v.goodput for k, v in here.plans.items()}
    assert there.running == pytest.approx(here.plans["stock"].goodput)
    baselines = await fits.options(p, None, with_solve=False)
    assert baselines.result is None and set(baselines.plans) == {"stock", "ee-batch"}


async def test_the_child_values_a_plan_as_the_node_would(fits):
    """The running plan's valuation for GET /e3/plan runs in the child (the queue's chains take up
    to seconds); it equals the in-process one term by term."""
    import json

    from e3.planner.cost_model import Overheads, value
    from e3.planner.options import options_for
    from tests.planner.test_dp import random_problem
    p = random_problem(11, types=1, max_blocks=5)
    p.overheads = Overheads(per_batch_s=0.3e-3, work_conserving=True)
    plan = options_for(p, None).result.plan
    there = await fits.value(p, plan)
    assert there == json.loads(json.dumps(value(p, plan).to_json()))
    assert there["goodput"] == pytest.approx(plan.goodput)
