"""The generation benchmark's pure parts: token timing, the pass rule, the search, mixes, bound, agreement."""
import pytest

from bench.goodput import search
from bench.llm_goodput import (Settings, agreement, bound, choose_splits, exit_shares, mix_picks, node_config,
                               parse_args, passed, split_easy_hard)
from bench.llm_load import TokenTimes, summarise

TTFT, TPOT = 1.0, 0.25


def test_token_latencies_are_ttft_then_gaps():
    r = TokenTimes(sent=10.0, status=200, tokens=[1, 2, 3], layers=[18] * 3, arrivals=[10.8, 11.0, 11.4])
    assert r.latencies() == pytest.approx([0.8, 0.2, 0.4])
    assert r.good_tokens(TTFT, TPOT) == 2           # the third came 0.4 s after the second
    assert r.good_tokens(0.5, TPOT) == 1            # a late first token counts against TTFT only


def test_refused_and_short_answers_miss_their_missing_tokens():
    ok = TokenTimes(0.0, 200, [1, 2], [18, 12], [0.5, 0.6])
    short = TokenTimes(0.0, 200, [1], [18], [0.5])
    refused = TokenTimes(0.0, 503)
    r = summarise([ok, short, refused], rate=1.0, duration_s=3, max_tokens=2, ttft_slo_s=TTFT, tpot_slo_s=TPOT,
                  lags_ms=[0.0], picks=[0, 1, 2], keep_tokens=True)
    assert (r.tokens_asked, r.tokens_good, r.answered, r.first_good) == (6, 3, 1, 2)
    assert r.token_fraction == pytest.approx(0.5) and r.first_fraction == pytest.approx(2 / 3)
    assert r.statuses == {"200": 2, "503": 1}
    assert r.exit_layers == {"12": 1, "18": 2}
    assert r.token_lists == [[1, 2], [1], []]


def probe_result(tokens, firsts, lag=0.0):
    return {"token_fraction": tokens, "first_fraction": firsts, "send_lag_ms_p99": lag}


@pytest.mark.parametrize("tokens,firsts,lag,ok", [
    (1.0, 1.0, 0.0, True), (0.99, 0.99, 10.0, True), (0.989, 1.0, 0.0, False),
    (1.0, 0.98, 0.0, False), (1.0, 1.0, 51.0, False)])
def test_the_pass_rule_needs_tokens_first_tokens_and_the_schedule(tokens, firsts, lag, ok):
    assert passed(probe_result(tokens, firsts, lag), max_lag_ms=50.0) is ok


@pytest.mark.parametrize("capacity,start", [(30.0, 10.0), (30.0, 100.0), (4.0, 20.0)])
async def test_the_search_brackets_and_bisects_token_rates(capacity, start):
    async def run(rate, seed):
        return {"rate": rate, "passed": rate <= capacity, "client_limited": False}
    r = await search(run, start, bisect_steps=2, max_probes=6)
    assert capacity / 2 ** 0.25 <= r["goodput"] <= capacity    # a bracket of at most x2, halved twice
    assert any(not p["passed"] for p in r["probes"])


def test_easy_and_hard_prompts_split_at_the_median_and_mix_by_share():
    layers = [[6, 6], [18, 18], [12, 18], [9, 9]]    # means 6, 18, 15, 9
    easy, hard = split_easy_hard(layers)
    assert (easy, hard) == ([0, 3], [1, 2])
    picks = mix_picks(easy, hard, 0.8, 2000, seed=1)
    share = sum(p in easy for p in picks) / len(picks)
    assert 0.77 < share < 0.83
    assert split_easy_hard([[18, 18], [18, 18]]) == ([0, 1], [])
    assert set(mix_picks([0, 1], [], 0.2, 50, seed=1)) <= {0, 1}


def test_splits_go_where_enough_tokens_leave():
    layers = [[6, 18, 18, 15], [15, 18, 18, 18], [18, 18, 12, 18]]
    assert exit_shares(layers, [6, 9, 12, 15]) == pytest.approx({6: 1 / 12, 9: 0, 12: 1 / 12, 15: 2 / 12})
    assert choose_splits(layers, [6, 9, 12, 15], 0.1) == [15]
    assert choose_splits(layers, [6, 9, 12, 15], 0.5) == [15]              # none reaches it: the most used
    assert choose_splits([[18, 18]], [6, 9], 0.05) == [9]                  # none leaves: the deepest


def test_the_bound_pays_each_tokens_layers_plus_the_head_at_the_best_batch():
    profile = [{"batch": 1, "step_s": 0.09, "head_s": 0.06}, {"batch": 8, "step_s": 0.2, "head_s": 0.12},
               {"batch": 16, "step_s": 0.25, "head_s": 0.2}]
    b = bound(profile, [[9, 18], [18, 18]], num_layers=18, max_batch=8)
    layer = (0.2 - 0.12) / 18 / 8                   # batch 16 is over max_batch
    head = 0.12 / 8
    assert b["full_depth_tokens_per_s"] == pytest.approx(1 / (18 * layer + head), rel=1e-3)
    assert b["tokens_per_s"] == pytest.approx(1 / (15.75 * layer + head), rel=1e-3)
    assert b["cap_tokens_per_s"] == pytest.approx(1 / head, rel=1e-3)
    assert 1 < b["over_full"] < b["cap_over_full"]


def test_agreement_compares_each_token_with_full_depth_at_its_position():
    reference = [[1, 2, 3], [4, 5, 6]]
    a = agreement([[1, 2, 9], [4, 5, 6], []], [0, 1, 0], reference)
    assert (a["agreeing"], a["tokens"], a["identical_sequences"], a["sequences"]) == (5, 6, 1, 3)
    assert a["agreement"] == pytest.approx(5 / 6, abs=1e-4)


def test_the_systems_differ_only_in_their_exits_and_splits():
    s = Settings()
    full, ee, e3 = (node_config(n, s, [12, 15], 8000) for n in ("full", "ee", "e3"))
    assert full["llm"]["use_exits"] is False and ee["llm"]["use_exits"] is True
    assert "split_layers" not in ee["llm"] and e3["llm"]["split_layers"] == [12, 15]
    assert {k: v for k, v in e3["llm"].items() if k != "split_layers"} == ee["llm"]
    with pytest.raises(ValueError, match="unknown system"):
        node_config("stock", s, [], 8000)


def test_bad_options_are_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--llm", "--tpot-slo-ms", "0"])
    assert exc.value.code == 2 and "--tpot-slo-ms must be positive" in capsys.readouterr().err
    assert parse_args(["--llm", "--quick"]).tag == "cpu-quick"
