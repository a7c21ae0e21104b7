"""The prepared GPU evidence script (bench/gpu/run.sh): its CPU dry run, and the parts it is made of.

The dry run keeps the script from rotting where CI has no GPU: every step must
run, the GPU tests must skip cleanly, and the summary must say so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import replay_model, summary

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_dry_run_wires_every_step_and_the_gpu_tests_skip_cleanly(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("E3_CACHE", None)
    proc = subprocess.run(["bash", "bench/gpu/run.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] and s["dry_run"]
    assert [st["step"] for st in s["steps"]] == list(summary.STEPS)
    assert all(st["rc"] == 0 for st in s["steps"]), s["steps"]
    assert s["pytest_gpu"]["failed"] == 0 and s["pytest_gpu"]["passed"] == 0 and s["pytest_gpu"]["skipped"] >= 5
    assert s["cuda_ipc"]["ok"] is None                           # no CUDA here: not probed, and said so
    assert s["ipc_hop"]["device"] == "cpu" and s["ipc_hop"]["median_us"][0]["cuda"].startswith("not measured")
    g = json.loads((tmp_path / "goodput_gpu.json").read_text())
    assert g["label"] == replay_model.LABEL and g["dry_run"] and g["errors"] == []
    assert g["replay_match"] == 1.0                              # the fitted ramps replay the table exactly
    assert replay_model.LABEL in (tmp_path / "goodput_gpu.md").read_text()
    assert "llm: not yet: issue 13" in (tmp_path / "run.log").read_text()


def test_an_unknown_argument_is_refused(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu/run.sh", "--fast"], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _steps(tmp_path: Path, rcs: dict[str, int]) -> Path:
    d = tmp_path / "steps"
    d.mkdir()
    (d / "steps.tsv").write_text("".join(f"{n}\t{rcs.get(n, 0)}\t1500\t60\t\n" for n in summary.STEPS))
    for name in ("versions.json", "ipc_probe.json"):
        (d / name).write_text("{}")
    (d / "pytest.xml").write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                                  '<testcase classname="t" name="b"><failure message="boom"/></testcase>'
                                  '</testsuite></testsuites>')
    return d


def _results(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("run.log", "ipc_hop_x.md"):
        (out / name).write_text("")
    (out / "ipc_hop_x.json").write_text(json.dumps({"device": "cuda:0", "rows": []}))
    (out / "goodput_gpu.md").write_text("")
    (out / "goodput_gpu.json").write_text(json.dumps({"label": "l", "dry_run": False, "ratios": {}, "runs": {},
                                                      "skipped": [], "errors": [], "replay_match": 1.0}))
    return out


def test_the_summary_fails_on_a_timed_out_step_and_a_missing_result(tmp_path):
    steps, out = _steps(tmp_path, {"ipc_hop": 124}), _results(tmp_path)
    (out / "goodput_gpu.md").unlink()
    assert summary.main(["--steps", str(steps), "--out", str(out)]) == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["failed_steps"] == ["ipc_hop"] and s["missing_files"] == ["goodput_gpu.md"]
    assert [st["timed_out"] for st in s["steps"] if st["step"] == "ipc_hop"] == [True]
    assert s["pytest_gpu"]["passed"] == 1 and s["pytest_gpu"]["failures"] == [{"test": "t::b", "message": "boom"}]


def test_the_summary_passes_when_every_step_did(tmp_path):
    steps, out = _steps(tmp_path, {}), _results(tmp_path)
    assert summary.main(["--steps", str(steps), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"][0]["seconds"] == 1.5


def test_minilm_exits_map_by_depth_onto_a_deeper_model():
    table = {"num_blocks": 6, "ramp_blocks": [0, 1, 2, 3, 4], "exit_point": [0, 1, 2, 3, 4, 5]}
    # MiniLM's ramp after layer e (of 6) -> the ramp after layer 2e + 1 (of 12); the head stays the head.
    assert replay_model.map_exits(table, 12) == [1, 3, 5, 7, 9, 11]
    assert replay_model.map_exits(table, 4) == [0, 0, 1, 2, 2, 3]


def test_the_recorded_table_is_the_cpu_minilm_pattern():
    t = replay_model.load_table()
    assert t["num_blocks"] == 6 and len(t["exit_point"]) == sum(t["exit_counts"].values())
    assert t["exit_counts"]["0"] > 0 and t["exit_counts"][str(len(t["ramp_blocks"]))] > 0   # easy and hard inputs


def test_a_rerun_names_its_jobs_and_keeps_the_measuring_order():
    from bench.gpu.goodput_gpu import JOBS, parse_jobs
    assert parse_jobs(None) == JOBS
    assert parse_jobs("20:80/ee-batch, 20:80/e3") == (("20:80", "e3"), ("20:80", "ee-batch"))
    with pytest.raises(SystemExit, match="unknown jobs"):
        parse_jobs("50:50/e3")
