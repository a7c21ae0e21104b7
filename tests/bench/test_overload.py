"""bench/overload.py and bench/soak.py: their pure parts, and each run end to end with tiny
settings against a real node so that CI keeps both working."""
import json
import os

import pytest

from bench import overload, soak
from e3.models.registry import resolve


def test_node_counts_read_the_request_counters_from_prometheus_text():
    text = "\n".join(['# HELP e3_inputs_total Inputs by outcome', 'e3_inputs_total{outcome="admitted"} 12.0',
                      'e3_within_slo_total 9.0', 'e3_http_refused_total{reason="concurrency"} 3.0',
                      'e3_http_refused_created{reason="concurrency"} 1.7e9', 'e3_latency_seconds_sum 0.4'])
    counts = overload.node_counts(text)
    assert counts == {"inputs:admitted": 12.0, "within_slo": 9.0, "http_refused:concurrency": 3.0}
    assert overload.delta({"within_slo": 4.0}, counts) == {"http_refused:concurrency": 3, "inputs:admitted": 12,
                                                           "within_slo": 5}


def phase(name, goodput, good_fraction=1.0, lag=1.0, foreign=0.0, peak=300.0):
    return {"phase": name, "rate": 10.0, "sent": 100, "goodput": goodput, "good_fraction": good_fraction,
            "refused": 5, "late": 1, "errors": 0, "latency_ms": {"p99": 50.0}, "send_lag_ms_p99": lag,
            "client_limited": lag > 20, "foreign_cpu": foreign, "node": {"inputs:admitted": 90},
            "node_mb": {"start": 250.0, "peak": peak, "end": 260.0}}


def test_the_summary_judges_goodput_against_1x_recovery_memory_and_conditions():
    phases = [phase("1x", 100.0), phase("2x", 95.0), phase("3x", 85.0, lag=40.0, foreign=0.3, peak=320.0),
              phase("after", 100.0, good_fraction=0.995)]
    r = overload.summarise("digits", "digits-resnet", 100.0, {"probes": [], "client_limited": False}, phases)
    assert r["goodput_ratio"] == {"1x": 1.0, "2x": 0.95, "3x": 0.85, "after": 1.0}
    assert r["recovered"] and r["node_rss_growth_mb"] == 70.0
    assert r["client_limited"] and r["noisy"]
    env = {"machine": "m", "python": "3", "torch": "t", "aiohttp": "a", "date": "d"}
    md = overload.render_md([r], env, "cmd", overload.Settings())
    assert "NOISY" in md and "CLIENT-LIMITED in 3x" in md and "| 3x | 10 | 85 | 0.85 |" in md
    assert "on the same cores" in md
    pinned = overload.render_md([r], env, "cmd", overload.Settings(node_cpus=frozenset({0}), client_cpus=frozenset({1})))
    assert "pinned to cores [0]" in pinned and "1 thread(s)" in pinned and "on cores [1]" in pinned


def test_cpu_lists_are_read_and_checked_against_the_cores_we_have():
    from bench.nodes import parse_cpus
    usable = sorted(os.sched_getaffinity(0))
    assert parse_cpus(str(usable[0])) == frozenset({usable[0]})
    assert parse_cpus(",".join(map(str, usable))) == frozenset(usable)
    assert parse_cpus(f"{usable[0]}-{usable[0]}") == frozenset({usable[0]})
    with pytest.raises(ValueError, match="cannot read CPU list 'x'"):
        parse_cpus("x")
    with pytest.raises(ValueError, match="names cores this machine does not give us"):
        parse_cpus("4096")


def test_the_node_and_client_may_not_share_cores():
    with pytest.raises(SystemExit):
        overload.parse_args(["--node-cpus", "0", "--client-cpus", "0"])


def test_soak_growth_is_measured_from_the_first_window():
    w = lambda t, node, worker: {"t_s": t, "sent": 10, "good": 10, "statuses": {"200": 10}, "p99_ms": 5.0,
                                 "send_lag_ms_p99": 1.0, "foreign_cpu": 0.01, "node": node,
                                 "workers": {"7": worker}}
    r = soak.summarise([w(30, 200.0, 100.0), w(60, 202.0, 110.0)], "digits", 50.0, 1.0, 100.0)
    assert r["node_rss_growth_pct"] == 1.0 and r["worker_rss_growth_pct"] == {"7": 10.0}
    assert not r["noisy"] and not r["client_limited"] and r["good_fraction"] == 1.0


def test_the_proc_readers_see_this_process():
    assert soak.rss_mb(os.getpid()) > 10
    share = soak.CpuShare()
    sum(i * i for i in range(200_000))
    assert 0.0 <= share.foreign() <= 1.0


@pytest.fixture
def default_model(e3_cache):
    return resolve("default")


@pytest.mark.e2e
@pytest.mark.slow
def test_overload_runs_end_to_end_with_tiny_settings(default_model, tmp_path):
    # The phases at a given capacity (a capacity search on a shared CI machine would measure the machine).
    code = overload.main(["--models", "digits", "--phase-s", "1", "--capacity", "20", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "overload.json").read_text())
    r = data["results"][0]
    assert r["capacity"] == 20 and r["capacity_given"] and [p["phase"] for p in r["phases"]] == ["1x", "2x", "3x", "after"]
    assert all(p["sent"] > 0 and p["node_mb"]["peak"] > 50 for p in r["phases"])
    assert "capacity 20 req/s" in (tmp_path / "overload.md").read_text()


@pytest.mark.e2e
@pytest.mark.slow
def test_soak_runs_end_to_end_with_tiny_settings(default_model, tmp_path):
    assert soak.main(["--rate", "20", "--minutes", "0.04", "--window-s", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "soak.json").read_text())
    assert len(data["windows"]) >= 2 and data["windows"][0]["node"] > 50 and data["windows"][0]["workers"]
    assert "RSS growth" in (tmp_path / "soak.md").read_text()
