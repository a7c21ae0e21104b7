"""The goodput benchmark's pure parts: bounds, batch choice, the rate search, mixes, scoring."""
import pytest

from bench.goodput import oracle_goodput, scores, search
from bench.loadgen import pick_inputs, summarise
from bench.workloads import Pools
from e3.planner.profiles import DeviceProfile

BATCHES = [1, 2, 4, 8, 16, 32]


def profile(fixed=1e-3, per=0.1e-3, blocks=4):
    """A block costs fixed + per x rows: batching pays, up to a limit."""
    cost = [fixed + per * b for b in BATCHES]
    small = [1e-5 * b for b in BATCHES]
    return DeviceProfile("cpu-test", BATCHES, [list(cost) for _ in range(blocks)], [list(small)] * (blocks - 1),
                         list(small), 0.0, 0.0)


def test_oracle_pays_each_block_at_the_best_per_sample_cost():
    p = profile()
    best = min((1e-3 + 0.1e-4 * 10 * b) / b for b in BATCHES)   # per sample, at batch 32
    survival = [1.0, 0.5, 0.5, 0.2]
    assert oracle_goodput(p, survival, devices=2) == pytest.approx(2 / (best * sum(survival)))


def test_a_baselines_batch_is_where_the_cost_model_puts_its_plan_best():
    """Picked under the same model as e3's plans, from the e3 node's view and this mix's exits."""
    from pathlib import Path

    from bench.goodput import baseline_batch
    from e3.planner.cost_model import Overheads
    from e3.planner.baselines import best_all_ramps_plan, best_stock_plan
    from e3.planner.problem import DeviceType, Problem
    p = Problem(4, [0, 1, 2], [0.5, 0.4, 0.3], [100] * 4, [DeviceType("cpu", 1, 0.0, profile())],
                batch_sizes=BATCHES, slo_s=0.02, slack_s=0.002,
                overheads=Overheads(per_batch_s=1e-3, work_conserving=True)).validate()
    pools = Pools(Path("."), "m", [], [], [], [0, 0, 3, 3, 3, 1, 2, 3, 3, 3], 4, [0, 1, 2])
    view, picks = {"planner": {"problem": p.to_json()}}, list(range(10))
    stock = baseline_batch(view, pools, picks, "stock")
    p.survival = [0.8, 0.7, 0.6]                   # the picks' exits: 2 of 10 at ramp 0, 1 at 1, 1 at 2
    assert stock == best_stock_plan(p).batch
    assert baseline_batch(view, pools, picks, "ee-batch") == best_all_ramps_plan(p).batch
    assert baseline_batch(view, pools, picks, "ee-1") == 1
    assert 1 < stock < 32         # batching pays, and the 20 ms SLO leaves batch 32 no room to queue


def fake_node(capacity):
    """A probe against a node that meets the SLO exactly up to `capacity` req/s."""
    seen = []

    async def run(rate, seed):
        seen.append(rate)
        ok = rate <= capacity
        return {"rate": rate, "passed": ok, "client_limited": False, "correct": 9, "labelled": 10,
                "agree": 8, "ok": 10}
    return run, seen


@pytest.mark.parametrize("capacity,start", [(300.0, 100.0), (300.0, 1000.0), (50.0, 400.0)])
async def test_search_brackets_then_bisects_towards_the_capacity(capacity, start):
    run, seen = fake_node(capacity)
    out = await search(run, start, bisect_steps=6)
    assert out["goodput"] <= capacity
    assert out["goodput"] >= capacity * 0.9
    assert any(r > capacity for r in seen), "the search must have seen a failing rate"


def test_scores_are_accuracy_and_agreement_of_answered_requests():
    assert scores({"correct": 9, "labelled": 10, "agree": 8, "ok": 10}) == {
        "accuracy": 0.9, "agreement": 0.8, "scored": 10}
    assert scores({"ok": 0})["accuracy"] is None


async def test_search_reports_nothing_when_no_rate_passes():
    run, _ = fake_node(0.1)
    out = await search(run, 100.0, bisect_steps=3)
    assert out["goodput"] == 0.0 and out["at_goodput"] == {}


def pools():
    # blocks 0..3, ramps after 0, 1, 2; exit point 3 is the head
    return Pools(None, "m", list(range(6)), [0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 1, 1], [0, 0, 1, 2, 3, 3], 4,
                 [0, 1, 2])


def test_mix_draws_easy_and_hard_in_the_asked_share():
    p = pools()
    picks = p.mix(0.8, 5000, seed=1)
    easy = sum(p.exit_point[i] == 0 for i in picks) / len(picks)
    assert set(p.exit_point[i] for i in picks) == {0, 3}
    assert easy == pytest.approx(0.8, abs=0.02)


def test_block_survival_counts_who_runs_each_block():
    p = pools()
    # exits after blocks 0, 0, 1, 2, 3, 3
    assert p.block_survival(list(range(6))) == [1.0, pytest.approx(4 / 6), pytest.approx(3 / 6), pytest.approx(2 / 6)]


def test_phases_choose_inputs_by_arrival_time():
    phases = [{"start_s": 0, "picks": [0]}, {"start_s": 10, "picks": [1, 2]}]
    picks = pick_inputs([0.5, 9.9, 10.0, 25.0], 5, phases, seed=0)
    assert picks[:2] == [0, 0] and all(p in (1, 2) for p in picks[2:])


def test_summary_scores_accuracy_agreement_and_the_timeline():
    def ok(label, ms):
        return (200, ms, (label, 0))
    records = [ok(1, 10), ok(0, 150), (503, 1.0, None), ok(1, 20)]
    r = summarise(records, [0, 1, 2, 0], labels=[1, 1, 0], rate=4, duration_s=2, slo_ms=100,
                  lags=[0, 0, 0, 0], times=[0.1, 0.2, 1.5, 1.6], reference=[1, 0, 0])
    assert (r.sent, r.ok, r.good) == (4, 3, 2)
    assert (r.correct, r.labelled, r.agree) == (2, 3, 3)
    assert r.timeline[:2] == [[2, 1], [2, 1]]
    assert r.statuses == {"200": 3, "503": 1}


def test_hop_transfer_prices_each_split_boundary_of_the_plan():
    from bench.goodput import hop_transfer
    from e3.planner.solve import solve
    from tests.planner.test_simulator import one_stage_problem
    p = one_stage_problem(survival=(0.3, 0.1))
    plan = solve(p).plan
    out = hop_transfer({"planner": {"plan": plan.to_json(), "problem": p.to_json()}})
    cuts = [last for _, last in plan.splits[:-1]]
    assert list(out["ms_per_hop"]) == [f"after block {c}" for c in cuts] and cuts
    prof = p.devices[0].profile
    assert out["ms_per_hop"][f"after block {cuts[0]}"] == pytest.approx(
        prof.transfer(p.boundary_bytes[cuts[0]] * plan.batch) * 1000, abs=1e-4)
    assert hop_transfer({"planner": {"plan": None, "problem": None}}) is None


def test_a_probe_line_says_whether_requests_were_late_or_refused(capsys):
    from bench.goodput import judged
    r = {"rate": 50.0, "good_fraction": 0.9, "latency_ms": {"p99": 120.0}, "send_lag_ms_p99": 1.0,
         "ok": 95, "good": 90, "statuses": {"200": 95, "503": 4, "504": 1}}
    judged(r, {"0": 1.5}, max_lag_ms=20.0)
    assert "missed: 5 late, 4 x 503, 1 x 504" in capsys.readouterr().out
    judged({**r, "ok": 100, "good": 100, "good_fraction": 1.0, "statuses": {"200": 100}}, {}, 20.0)
    assert "missed" not in capsys.readouterr().out


def test_repeats_report_the_median_run_and_the_range():
    from bench.goodput import median_result, ratio_range, spread
    runs = [{"goodput": g, "seed": i} for i, g in enumerate([120.0, 90.0, 150.0])]
    assert median_result(runs)["seed"] == 0
    assert median_result(runs[:2])["goodput"] == 90.0, "the lower median of an even count: a real run"
    s = spread(runs)
    assert (s["median"], s["min"], s["max"]) == (120.0, 90.0, 150.0)
    r = ratio_range(s, {"median": 100.0, "min": 80.0, "max": 125.0})
    assert r == {"median": 1.2, "low": 0.72, "high": 1.875}


def test_baselines_are_valued_by_the_cost_model_as_their_nodes_run_them():
    from bench.goodput import baseline_value
    from e3.planner.cost_model import Overheads, value
    from e3.planner.plan import Group, Plan
    from e3.planner.problem import DeviceType, Problem
    p = Problem(4, [0, 1, 2], [0.5, 0.4, 0.3], [100] * 4, [DeviceType("cpu", 1, 0.0, profile())],
                batch_sizes=BATCHES, overheads=Overheads(per_batch_s=1e-3, work_conserving=True)).validate()
    stock = Plan(8, [[0, 3]], [Group("cpu", 1, [0])], [], 0, 0, 0, [0.0])
    assert baseline_value(p, "stock", 8) == pytest.approx(value(p, stock).goodput)
    ee = baseline_value(p, "ee-batch", 8)
    assert ee != baseline_value(p, "ee-1", 1) and ee > 0


def test_observed_baselines_run_the_planner_in_shadow_mode_and_report_their_own_valuation():
    from bench.goodput import shadow_view
    from bench.nodes import node_config
    from bench.report import observed_lines
    from e3.runtime.config import E3Config
    kw = dict(batch=4, slo_ms=100.0, workers=2, threads=1, port=1)
    ee = node_config("ee-batch", "/m", [0, 2], observe=True, **kw)
    assert ee["replan"] == {"enabled": True, "observe": True} and ee["batching"]["cuts"] == [0, 2]
    E3Config.from_dict({k: ee[k] for k in ("batching", "replan")})       # a config the node accepts
    assert node_config("stock", "/m", [0, 2], **kw)["replan"] == {"enabled": False, "observe": False}
    assert node_config("e3", "/m", [0, 2], observe=True, **kw)["replan"] == {"enabled": True, "observe": False}
    view = {"planner": {"prediction": {"goodput": 140.5}, "problem": {"overheads": {"compute_scale": 1.4}},
                        "watch": {"last": {"predicted_capacity": 170.0, "measured_capacity": 150.0, "rate": 120.0}},
                        "last_solve": {"decision": "observing: would run the stock plan"}}}
    o = shadow_view(view)
    assert o["predicted_goodput"] == 140.5 and o["overheads"] == {"compute_scale": 1.4}
    [line] = observed_lines({"goodput": {"ee-batch": 117.0}, "observed_baselines": {"ee-batch": o}})
    assert "predicted 140.5 req/s (measured 117.0)" in line and "predicted 170.0 vs measured 150.0" in line
