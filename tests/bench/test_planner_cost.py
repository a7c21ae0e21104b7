"""bench/planner_cost.py: its pure parts (pinning e3's plan, roles, the summary and its table)."""
import os
import time

import pytest

from bench import planner_cost as pc


def test_the_fixed_node_pins_the_plan_e3_ran_with_its_planner_off():
    e3 = {"batching": {"slo_ms": 100.0}, "replan": {"enabled": True}, "server": {"port": 1}}
    cfg = pc.fixed_config(e3, {"splits": [[0, 0], [1, 3], [4, 5]], "batch": 8})
    assert cfg["batching"] == {"slo_ms": 100.0, "batch": 8, "cuts": [0, 3]}
    assert cfg["replan"] == {"enabled": False} and cfg["server"]["port"] != 1
    assert e3["replan"]["enabled"] and "cuts" not in e3["batching"]          # the e3 config is untouched
    assert pc.fixed_config(e3, {"splits": [[0, 5]], "batch": 4})["batching"]["cuts"] == []


def test_roles_tell_the_planning_child_from_workers():
    assert pc.role_of(b"python3\0-m\0e3.planner.forecast_server\0") == "planning"
    assert pc.role_of(b"python3\0-c\0from e3.runtime.worker_process import main\0") == "workers"
    meter = pc.CpuMeter(os.getpid())
    t = time.process_time()
    while time.process_time() - t < 0.1:        # several of /proc's 10 ms ticks, whatever the machine
        pass
    assert meter.per_s()["node"] > 0 and set(meter.per_s()) == set(pc.ROLES)


def probe(rate, within, planning):
    return {"rate": rate, "within_slo": within, "p99_ms": 50.0, "send_lag_ms_p99": 1.0,
            "cpu_per_s": {"node": 0.1, "workers": 0.8, "planning": planning}}


def test_the_summary_gives_each_rate_and_system_its_median_and_range():
    repeats = [{"plan": {"splits": [[0, 5]], "batch": 8}, "plan_at_end": {"splits": [[0, 5]], "batch": 8},
                "e3": [probe(35, 0.99, 0.05), probe(50, 0.97, 0.07)],
                "fixed": [probe(35, 1.0, 0.0), probe(50, 0.98, 0.0)]},
               {"plan": {"splits": [[0, 0], [1, 5]], "batch": 8}, "plan_at_end": {"splits": [[0, 5]], "batch": 8},
                "e3": [probe(35, 0.995, 0.03), probe(50, 0.99, 0.09)],
                "fixed": [probe(35, 1.0, 0.0), probe(50, 1.0, 0.0)]}]
    rows = pc.summarise(repeats, [35, 50])
    e3_50 = next(r for r in rows if r["rate"] == 50 and r["system"] == "e3")
    assert e3_50["within_slo"] == {"median": 0.98, "min": 0.97, "max": 0.99}
    assert e3_50["cpu_planning"] == {"median": 0.08, "min": 0.07, "max": 0.09}
    result = {"command": "python3 -m bench.planner_cost", "wall_s": 60.0, "repeats": repeats, "summary": rows,
              "environment": {"date": "d", "machine": "m", "python": "3", "torch": "t"},
              "options": {"model": "minilm", "mix": "20:80", "repeats": 2, "probe_s": 15.0, "slo_ms": 100.0,
                          "workers": 2, "threads": 1}}
    md = pc.markdown(result)
    assert "| 50 | e3 | 98.0% [97.0%–99.0%] |" in md and "| 0.08 [0.07–0.09] |" in md
    assert "repeat 2: splits [[0, 0], [1, 5]] at batch 8" in md
    assert "2 x 1 threads" in md and "stock" not in md


def test_the_stock_node_is_summarised_beside_e3_and_fixed_when_measured():
    repeats = [{"plan": {"splits": [[0, 5]], "batch": 8}, "plan_at_end": {"splits": [[0, 5]], "batch": 8},
                "e3": [probe(35, 0.9, 0.05)], "fixed": [probe(35, 0.95, 0.0)], "stock": [probe(35, s, 0.0)]}
               for s in (0.97, 0.99)]
    rows = pc.summarise(repeats, [35])
    assert [r["system"] for r in rows] == ["e3", "fixed", "stock"]
    assert rows[2]["within_slo"] == {"median": 0.98, "min": 0.97, "max": 0.99}
    assert pc.systems_of([{"e3": [], "fixed": []}]) == ["e3", "fixed"]


def test_workers_and_stock_options_are_parsed():
    o = pc.parse_args(["--workers", "2x1", "--stock"])
    assert (o.workers, o.threads, o.stock) == (2, 1, True)
    assert pc.parse_args([]).stock is False


@pytest.mark.parametrize("argv,message", [(["--rates", "a,b"], "comma-separated"), (["--rates", "0"], "positive"),
                                          (["--repeats", "0"], "at least 1"),
                                          (["--workers", "two"], "WORKERSxTHREADS"),
                                          (["--workers", "0x2"], "at least one worker")])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pc.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
