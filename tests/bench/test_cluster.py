"""bench/cluster.py's pure parts: the nodes' command lines and the config each node gets from them,
when a system is ready, the per-run figures, the medians and the paired ratios, and the record."""
import json
import math
import os

import pytest

from bench import cluster
from e3.runtime.cli import build_config, parse_args


def configs(system, tmp_path, cut=0):
    """The E3Config each process of `system` would run with (bin/e3-node's own parsing; no process)."""
    config_file = None
    if cluster.coordinator_config(system, cut) is not None:
        config_file = tmp_path / f"{system}.json"
        config_file.write_text(json.dumps(cluster.coordinator_config(system, cut)))
        config_file = str(config_file)
    cmds = cluster.commands(system, cut, 8, 4321, None if system == "one-node" else "/t/token", config_file)
    return {name: build_config(parse_args(argv)) for name, argv in cmds}


def test_the_one_node_runs_three_one_thread_workers_on_the_fixed_plan(tmp_path):
    (name, c), = configs("one-node", tmp_path, cut=0).items()
    assert name == "node" and not c.cluster.enabled
    assert (c.workers.cpu_workers, c.workers.threads_per_worker) == (3, 1)
    assert c.batching.cuts == [0] and c.batching.batch == 8 and not c.replan.enabled
    assert (c.server.host, c.server.port, c.server.grpc_port) == ("127.0.0.1", 4321, 0)


@pytest.mark.parametrize("system", ["cluster", "cluster-split"])
def test_a_cluster_is_a_coordinator_and_two_members_of_one_worker_each(system, tmp_path):
    got = configs(system, tmp_path, cut=1)
    assert list(got) == ["coordinator", "member@127.0.0.2", "member@127.0.0.3"]
    coordinator = got["coordinator"]
    assert coordinator.cluster.token_file == "/t/token" and coordinator.cluster.join is None
    assert coordinator.batching.cuts == [1] and coordinator.batching.batch == 8 and not coordinator.replan.enabled
    assert coordinator.cluster.split_hosts == ([["127.0.0.2"], ["127.0.0.3"]] if system == "cluster-split" else None)
    for host in cluster.MEMBER_HOSTS:
        m = got[f"member@{host}"]
        assert m.cluster.join == "http://127.0.0.1:4321" and m.server.host == host
        assert m.cluster.token_file == "/t/token" and m.cluster.split_hosts is None
    assert all((c.workers.cpu_workers, c.workers.threads_per_worker) == (1, 1) for c in got.values())


def test_the_commands_refuse_what_would_not_be_the_system():
    with pytest.raises(ValueError, match="unknown system"):
        cluster.commands("two-nodes", 0, 8, 1)
    with pytest.raises(ValueError, match="token"):
        cluster.commands("cluster", 0, 8, 1)
    with pytest.raises(ValueError, match="config file is missing"):
        cluster.commands("cluster-split", 0, 8, 1, "/t")
    with pytest.raises(ValueError, match="unexpected"):
        cluster.commands("cluster", 0, 8, 1, "/t", "/c.json")


def view(placement, members=(("127.0.0.2", [1000], "ready"), ("127.0.0.3", [1001], "ready")), local=("0",)):
    return {"coordinator": {"workers": {i: "cpu" for i in local}},
            "members": [{"address": a, "workers": w, "state": st} for a, w, st in members],
            "placement": {"batch": 8, "splits": [[0, 0], [1, 4]], "workers": placement}}


def test_a_cluster_is_ready_once_both_members_are_and_the_placement_is_theirs():
    assert cluster.cluster_ready(view([[0, 1000, 1001], [0, 1000, 1001]]), "cluster")
    assert not cluster.cluster_ready(view([[0], [0]]), "cluster")                     # not yet re-placed
    assert not cluster.cluster_ready(view([[0, 1000], [0, 1000]]), "cluster")
    warming = (("127.0.0.2", [1000], "ready"), ("127.0.0.3", [], "warming"))
    assert not cluster.cluster_ready(view([[0, 1000], [0, 1000]], warming), "cluster")
    assert not cluster.cluster_ready(view([[0, 1000], [0, 1000]], warming[:1]), "cluster")
    assert cluster.cluster_ready(view([[1000], [1001]]), "cluster-split")
    assert not cluster.cluster_ready(view([[1001], [1000]]), "cluster-split")           # the wrong way round
    assert not cluster.cluster_ready(view([[0], [0]]), "cluster-split")
    assert not cluster.cluster_ready({"members": [], "placement": None}, "cluster")
    assert cluster.one_node_ready({"placement": {"splits": [[0, 0], [1, 4]], "workers": [[0, 1, 2], [0, 1, 2]]}})
    assert not cluster.one_node_ready({"placement": {"splits": [[0, 4]], "workers": [[0, 1, 2]]}})


def loadgen_summary(sent=100, ok=90, good=80, p50=5.0, p99=40.0, lag=1.0):
    return {"sent": sent, "ok": ok, "good": good, "statuses": {"200": ok, "503": sent - ok},
            "latency_ms": {"p50": p50, "p90": 20.0, "p99": p99}, "send_lag_ms_p99": lag}


def test_a_run_reports_goodput_shares_and_latency_and_nothing_answered_as_none():
    r = cluster.run_figures(loadgen_summary(), duration_s=8.0, max_lag_ms=20.0)
    assert r["goodput"] == 10.0 and r["good_fraction"] == 0.8 and r["answered"] == 0.9
    assert (r["p50_ms"], r["p99_ms"], r["client_limited"]) == (5.0, 40.0, False)
    none = cluster.run_figures(loadgen_summary(ok=0, good=0, p50=math.nan, p99=math.nan, lag=30.0), 8.0, 20.0)
    assert none["p50_ms"] is None and none["p99_ms"] is None and none["client_limited"] and none["answered"] == 0.0
    json.dumps(none, allow_nan=False)


def run(system, repeat, rate, goodput, p50, p99):
    return {"system": system, "repeat": repeat, "rate": rate, "goodput": goodput, "good_fraction": 1.0,
            "answered": 1.0, "p50_ms": p50, "p99_ms": p99}


def test_medians_with_ranges_and_ratios_paired_by_repeat():
    runs = [run("one-node", 0, 100.0, 100.0, 4.0, 10.0), run("cluster", 0, 100.0, 90.0, 6.0, 30.0),
            run("one-node", 1, 100.0, 100.0, 5.0, 20.0), run("cluster", 1, 100.0, 100.0, 5.0, 20.0),
            run("one-node", 2, 100.0, 80.0, 8.0, 40.0), run("cluster", 2, 100.0, 40.0, None, None)]
    out = cluster.summarise(runs, ["one-node", "cluster"], [100.0])
    one = out["systems"]["one-node"]["100"]
    assert one["goodput"] == {"median": 100.0, "min": 80.0, "max": 100.0, "each": [100.0, 100.0, 80.0]}
    assert out["systems"]["cluster"]["100"]["p50_ms"]["each"] == [6.0, 5.0, None]     # a run with no answer
    assert out["systems"]["cluster"]["100"]["p50_ms"]["median"] == 5.5
    r = out["ratios"]["cluster"]["100"]
    assert r["p50"]["each"] == [1.5, 1.0, None] and (r["p50"]["min"], r["p50"]["max"]) == (1.0, 1.5)
    assert r["p99"]["median"] == 2.0 and r["goodput"]["each"] == [0.9, 1.0, 0.5] and r["goodput"]["median"] == 0.9
    assert "one-node" not in out["ratios"]
    assert cluster.ratio(1.0, 0.0) is None and cluster.stat([None, math.nan]) is None
    assert cluster.cell(r["goodput"], 2) == "0.90 [0.50-1.00]" and cluster.cell(None) == "n/a"
    assert cluster.cell(one["good_fraction"], pct=True) == "100.0% [100.0%-100.0%]"


def test_the_record_says_overhead_and_carries_every_run_and_setup():
    runs = [{**run(s, 0, 100.0, 95.0, 5.0, 9.0), "sent": 760, "send_lag_ms_p99": 1.0, "client_limited": False,
             "foreign_cpu": 0.2 if s == "cluster" else 0.0, "rows_per_batch": {"0": 1.1}, "statuses": {"200": 760},
             **({"link_frames_sent": {"127.0.0.2": 10}} if s != "one-node" else {})} for s in cluster.SYSTEMS]
    setups = [{"system": s, "repeat": 0, "commands": {"node": "bin/e3-node --port 4321 --cluster-token-file /t/x"},
               "ready_s": 5.0, "placement": {"workers": [[0]]}, "stopped": {"node": "SIGTERM: exited 0 in 0.5 s"},
               "problems": {"node": {"tracebacks": 0, "errors": ["2026 x e3.runtime.coordinator ERROR lost"],
                                     "warnings": []}}, "left_after_stop": []} for s in cluster.SYSTEMS]
    result = {"model": "digits-resnet", "cut": 0, "inputs": 540, "runs": runs, "setups": setups, "left_at_end": [],
              **cluster.summarise(runs, list(cluster.SYSTEMS), [100.0])}
    info = {"date": "d", "wall_s": 1.0, "python": "3", "torch": "t", "numpy": "n", "aiohttp": "a", "uvloop": "u",
            "load_before": [0.1, 0.2, 0.3], "load_after": [0.4, 0.5, 0.6], "lscpu": ["CPU(s): 2"]}
    s = cluster.Settings(rates=[100.0])
    md = cluster.render_md(result, info, s, "python3 -m bench.cluster --out x")
    assert md.startswith("# Cluster path OVERHEAD on one machine (not scale)")
    assert "nothing here can show a cluster serving more" in md
    assert "NOISY in 1 of 3 runs" in md and "--port PORT" in md and "--cluster-token-file TOKEN" in md
    assert "| 100 | one node | 95.0 [95.0-95.0] | 100.0% [100.0%-100.0%] | 100.0% [100.0%-100.0%] | 5.0 [5.0-5.0] | " \
           "9.0 [9.0-9.0] |" in md
    assert "| 100 | cluster, split per member | 1.000 [1.000-1.000] | 1.000 [1.000-1.000] | 1.000 [1.000-1.000] |" in md
    assert "e3.runtime.coordinator ERROR lost" in md and "load" in md.lower() and "CPU(s): 2" in md


def test_the_command_line_is_checked():
    s = cluster.parse_args(["--rates", "50,150", "--repeats", "1", "--systems", "one-node,cluster", "--out", "/x/y"])
    assert s.rates == [50.0, 150.0] and s.repeats == 1 and s.systems == ["one-node", "cluster"]
    assert str(s.out) == "/x/y" and cluster.Settings().rates == [100.0, 300.0, 600.0, 900.0]
    for bad in (["--rates", "0"], ["--rates", "a"], ["--systems", "cluster"], ["--systems", "one-node,x"],
                ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            cluster.parse_args(bad)


def test_group_members_sees_this_process_group_and_nothing_in_an_unused_one():
    assert os.getpid() in cluster.group_members({os.getpgid(0)})
    assert cluster.group_members({2 ** 22 + 12345}) == []


def test_member_losses_at_a_clean_stop_are_told_apart_from_other_errors():
    def setup(errors, stopped="SIGTERM: exited 0 in 0.7 s"):
        return {"stopped": {"coordinator": "SIGTERM: exited 0 in 0.3 s", "member@127.0.0.2": stopped},
                "members": [{"address": "127.0.0.2", "workers": [1000]}],
                "problems": {"coordinator": {"tracebacks": 0, "errors": errors, "warnings": []}}}
    lost = ["2026-12-04 02:23:46,125 e3.runtime.coordinator ERROR member 1 at 127.0.0.2 lost: the peer closed the link",
            "2026-12-04 02:23:46,125 e3.runtime.remote_pool ERROR worker 1000 on member 127.0.0.2 lost"]
    assert cluster.shutdown_losses_only([setup(lost), {"stopped": {"node": "SIGTERM: exited 0 in 0.4 s"},
                                                       "problems": {"node": {"errors": []}}}])
    assert not cluster.shutdown_losses_only([setup(lost + lost)])              # lost twice: not only at the stop
    assert not cluster.shutdown_losses_only([setup(lost[:1] + ["x ERROR applying the cluster plan failed"])])
    assert not cluster.shutdown_losses_only([setup(lost, stopped="SIGKILLED after 30 s")])
