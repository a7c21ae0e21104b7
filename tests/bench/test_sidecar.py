"""The sidecar path's pure parts: failure statuses, the shared sender, the bracket, the cost estimate,
and how the report shows it."""
import asyncio

import pytest

from bench import report
from bench.goodput import Settings, search, sidecar_cost
from bench.loadgen import open_loop
from bench.sidecar import status_of
from e3.models.errors import InvalidInputError
from e3.runtime.errors import DeadlineExceededError, NotReadyError, OverloadedError


@pytest.mark.parametrize("exc,status", [(OverloadedError("full"), 503), (NotReadyError("closing"), 503),
                                        (DeadlineExceededError("late"), 504), (InvalidInputError("bad"), 400),
                                        (ValueError("a bug"), 500)])
def test_a_failed_infer_counts_with_the_status_the_endpoint_would_answer(exc, status):
    assert status_of(exc) == status


async def test_open_loop_sends_everything_on_schedule_without_waiting_for_answers():
    started = []

    async def send(i, due):
        started.append(i)
        await asyncio.sleep(0.05)      # a slow answer must not delay the next send

    lags = await open_loop([0.0, 0.01, 0.02, 0.03], send)
    assert started == [0, 1, 2, 3]
    assert len(lags) == 4 and max(lags) < 20


async def test_search_brackets_by_the_given_factors():
    seen = []

    async def run(rate, seed):
        seen.append(round(rate, 3))
        return {"rate": rate, "passed": rate <= 110, "client_limited": False}

    out = await search(run, 100.0, bisect_steps=1, grow=1.25, shrink=0.8)
    assert seen[:2] == [100.0, 125.0]
    assert seen[2] == pytest.approx((100 * 125) ** 0.5, abs=1e-3)
    assert out["goodput"] == 100.0 and len(seen) == 3


def test_fails_at_is_the_lowest_failing_rate_above_the_goodput():
    from bench.goodput import fails_at
    probes = [{"rate": 100.0, "passed": True}, {"rate": 144.0, "passed": False}, {"rate": 120.0, "passed": False},
              {"rate": 80.0, "passed": False}]
    assert fails_at({"goodput": 100.0, "probes": probes}) == 120.0
    assert fails_at({"goodput": 100.0, "probes": probes[:1]}) is None


def measured(process_s, warm_s, search_s, probes):
    return {"process_s": process_s, "warm_s": warm_s, "search_s": search_s, "probes": [{}] * probes}


def test_sidecar_cost_extrapolates_each_search_to_the_full_settings():
    runs = [{"sidecar": {"e3": measured(process_s=36.0, warm_s=10.0, search_s=17.0, probes=4)}}]
    quick = Settings.quick()
    fixed, overhead = 36.0 - 10.0 - 17.0, 17.0 / 4 - quick.probe_s
    for systems in (("e3",), ("e3", "stock")):
        full = Settings.full(sidecar=systems)
        cost = sidecar_cost(runs, quick, full)
        # e3 needed 4 probes here, so it is priced at 4; stock, not measured, at the least a search takes
        e3 = round(fixed + full.e3_warm_s + 4 * (full.probe_s + overhead), 1)
        stock = round(fixed + full.warm_s + (2 + full.sidecar_bisect_steps) * (full.probe_s + overhead), 1)
        assert cost["this_run_s"] == 36.0
        assert cost["per_model_per_system_s"] == {"e3": e3, "stock": stock}
        assert cost["full_run_estimate_s"] == round(2 * (e3 + (stock if "stock" in systems else 0)))
    assert sidecar_cost([{"sidecar": {}}], quick, Settings.full()) is None


def summarised_run(sidecar):
    systems = {"e3": {"batch": 8, "client_limited": False}, "stock": {"batch": 4, "client_limited": True}}
    return {"model": "m", "mix": "80:20", "goodput": {"e3": 200.0, "stock": 100.0}, "systems": systems,
            "sidecar": sidecar}


def side(goodput, limited=False):
    return {"goodput": goodput, "client_limited": limited, "http_goodput": 200.0, "batch": 8,
            "latency_ms": {"p50": 20.0, "p99": 90.0}, "accuracy": 0.8, "mean_batch_rows": {"0": 3.0},
            "probes": [{"rate": goodput + 0.04, "passed": True, "send_lag_ms_p99": 1.5},    # unrounded
                       {"rate": goodput * 1.2, "passed": False, "send_lag_ms_p99": 40.0}], "startup_s": 2.0,
            "process_s": 30.0}


def test_the_summary_keeps_sidecar_goodput_per_system_and_the_table_shows_its_ratio_to_http():
    brief = report._brief(summarised_run({"e3": side(250.0) | {"fails_at": 300.0}, "stock": side(90.0, limited=True)}))
    assert brief["sidecar"] == {"e3": 250.0, "stock": 90.0}
    assert brief["sidecar_client_limited"] == ["stock"]
    table = report.sidecar_table([brief])
    assert "| m | 80:20 | e3 | 200 | 250 | 300 | 1.25 |" in table
    assert "| m | 80:20 | stock | 100 | 90 (client-limited) | – | 0.9 |" in table
    assert report.sidecar_table([report._brief(summarised_run({}))]) is None


def test_the_per_run_lines_say_it_is_the_in_process_path():
    [line] = report.sidecar_lines(summarised_run({"e3": side(250.0)}))
    assert line.startswith("- SIDECAR e3: goodput 250.0 req/s in-process (HTTP 200.0)")
    assert "p50/p99 20/90 ms, send lag p99 1.5 ms" in line and "accuracy 80.0%" in line


def test_the_readme_section_shows_the_sidecar_table_when_a_run_has_one(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.BEGIN}\n{report.END}\n")
    run = report._brief(summarised_run({"e3": side(250.0)})) | {
        "accuracy": {}, "ratios": {"e3/ee-batch": None, "e3/stock": 2.0, "e3/oracle": None}}
    report.update_readme(readme, {"q": {"machine": "box", "date": "today", "command": "c", "runs": [run]}})
    text = readme.read_text()
    assert report.SIDECAR_NOTE in text and "| m | 80:20 | e3 | 200 | 250 | – | 1.25 |" in text


def test_the_cost_line_states_the_estimate_and_how_it_was_made():
    cost = {"this_run_s": 40.0, "full_run_estimate_s": 84, "full_run_systems": ["e3"],
            "per_model_per_system_s": {"e3": 42.0, "stock": 33.0}, "fixed_s": 9.0, "overhead_per_probe_s": 0.1,
            "probes_per_search": {"e3": 4, "stock": 2}}
    line = report.cost_line(cost)
    assert line.startswith("The sidecar searches took 40.0 s of this run. Estimated addition to the full run "
                           "(sidecar systems e3): 84 s (1.4 min); per model and system: e3 42.0 s (4 probes), "
                           "stock 33.0 s (2 probes)")
    assert report.cost_line(None) == "The sidecar path was not measured in this run."
    with_last = report.cost_line(cost | {"last_full_run_without_sidecar_s": 1650.0})
    assert with_last.endswith("The last full run took 27.5 min without it: about 28.9 min with it.")


def test_the_last_full_run_time_leaves_out_its_own_sidecar(tmp_path):
    from bench.goodput import last_full_run_s
    assert last_full_run_s(tmp_path, "cpu") is None
    (tmp_path / "summary.json").write_text('{"cpu": {"wall_s": 1800.0, "sidecar_cost": {"this_run_s": 120.0}}}')
    assert last_full_run_s(tmp_path, "cpu") == 1680.0
