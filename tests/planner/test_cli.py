"""`bin/e3-plan` as a user runs it (subprocesses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAN = [sys.executable, str(ROOT / "bin" / "e3-plan")]
EXAMPLES = ROOT / "planner" / "examples"


def run(*args):
    return subprocess.run(PLAN + [str(a) for a in args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "error"})


def test_every_example_solves():
    for path in sorted(EXAMPLES.glob("*.json")):
        out = run(path)
        assert out.returncode == 0, (path.name, out.stdout, out.stderr)
        assert "predicted goodput" in out.stdout and "binding:" in out.stdout and out.stderr == ""


def test_json_output_for_machines():
    out = run(EXAMPLES / "digits-cpu.json", "--json")
    result = json.loads(out.stdout)
    assert result["feasible"] and result["plan"]["goodput"] > 0
    stages = result["plan"]["stages"]
    assert stages[0]["first"] == 0 and stages[-1]["last"] == result["plan"]["splits"][-1][1]
    assert {"device", "replicas", "shared"} <= set(stages[0])


def test_capacity_question_and_what_if_counts():
    out = run(EXAMPLES / "v100-p100-k80.json", "--json", "--objective", "cost", "--rate", "6000")
    plan = json.loads(out.stdout)["plan"]
    assert plan["goodput"] >= 6000 and plan["cost_per_hour"] > 0
    fewer = run(EXAMPLES / "v100-p100-k80.json", "--objective", "goodput", "--devices", "v100=0,p100=0,k80=1")
    assert fewer.returncode == 0 and "1 x k80" in fewer.stdout
    short = run(EXAMPLES / "v100-p100-k80.json", "--devices", "v100=0,p100=0,k80=1")
    assert short.returncode == 1 and "needs more devices than are available" in short.stdout


def test_simulation_is_labelled():
    out = run(EXAMPLES / "digits-cpu.json", "--simulate", "0.5")
    assert out.returncode == 0, out.stderr
    sim = [line for line in out.stdout.splitlines() if "within the" in line or "goodput" in line.lower()]
    assert all(line.startswith("SIMULATION") for line in out.stdout.splitlines()[-4:])
    assert sim


def test_infeasible_problem_says_why(tmp_path):
    out = run(_broken(tmp_path, lambda d: d.update(slo_ms=0.5, slack_ms=0.1)))
    assert out.returncode == 1 and "no plan meets the SLO: slo:" in out.stdout


def _broken(tmp_path, edit):
    data = json.loads((EXAMPLES / "digits-cpu.json").read_text())
    edit(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.__setitem__("survival", [0.5, 0.7, 0.1, 0.0]), "survival: expected non-increasing"),
    (lambda d: d.__setitem__("survival", [0.5]), "survival: expected 4 fractions in [0, 1], one per ramp, got [0.5]"),
    (lambda d: d.__setitem__("survival", [1.5, 0.5, 0.1, 0.0]), "got [1.5, 0.5, 0.1, 0.0]"),
    (lambda d: d["model"].__setitem__("ramp_blocks", [0, 9]), "model.ramp_blocks: expected increasing block indices"),
    (lambda d: d["model"].__setitem__("layers", 3), "model.layers: expected a known field"),
    (lambda d: d.__setitem__("objective", "speed"), "objective: expected 'goodput' or 'cost', got 'speed'"),
    (lambda d: d.__setitem__("objective", "cost"), "rate: expected a positive request rate"),
    (lambda d: d.__setitem__("slo_ms", "fast"), "slo_ms: expected a number, got 'fast'"),
    (lambda d: d.__setitem__("slo_ms", -5), "slo_ms: expected in (0, 600000], got -5"),
    (lambda d: d.__setitem__("utilisation", 1.2), "utilisation: expected a number in (0, 1], got 1.2"),
    (lambda d: d.__setitem__("batch_sizes", [0, 4]), "batch_sizes: expected a non-empty list of integers"),
    (lambda d: d["devices"][0].__setitem__("count", "two"), "devices[0].count: expected an integer, got 'two'"),
    (lambda d: d["devices"][0].__setitem__("price_per_hour", None), "devices[0].price_per_hour: expected a number"),
    (lambda d: d["devices"][0]["profile"].__setitem__("head_s", [1]), "head_s must hold 7 finite non-negative seconds, got [1]"),
    (lambda d: d["devices"][0].pop("profile"), "devices[0].profile: expected a value (the field is missing)"),
    (lambda d: d.pop("model"), "model: expected a value (the field is missing)"),
    (lambda d: d.__setitem__("slo", 3), "slo: expected a known field"),
    (lambda d: d.__setitem__("devices", []), "devices: expected a non-empty list, got []"),
    (lambda d: d["devices"][0]["profile"]["block_s"][2].__setitem__(0, float("inf")),
     "block_s[2] must hold 7 finite non-negative seconds, got [inf"),
    (lambda d: d["devices"][0]["profile"].__setitem__("transfer_fixed_s", -0.001),
     "devices[0].profile: profile 'cpu-1t': transfer_fixed_s must be a finite number >= 0, got -0.001"),
    (lambda d: d["devices"][0]["profile"].__setitem__("transfer_fixed_s", float("nan")),
     "transfer_fixed_s must be a finite number >= 0, got nan"),
    (lambda d: d["devices"][0]["profile"].__setitem__("transfer_fixed_s", "0.1"),
     "transfer_fixed_s must be a finite number >= 0, got '0.1'"),
    (lambda d: d["devices"][0]["profile"].__setitem__("transfer_s_per_byte", -1e-9),
     "transfer_s_per_byte must be a finite number >= 0, got -1e-09"),
    (lambda d: d["devices"][0].__setitem__("profile", {}),
     "devices[0].profile: missing field 'device' (required: device, batch_sizes, block_s, ramp_s, head_s)"),
    (lambda d: d["devices"][0]["profile"].pop("ramp_s"), "devices[0].profile: missing field 'ramp_s'"),
    (lambda d: d["devices"][0]["profile"].__setitem__("speed", 3), "devices[0].profile: unknown field 'speed'"),
    (lambda d: d["devices"][0]["profile"].__setitem__("block_s", 5), "block_s must be a list of rows, got 5"),
    (lambda d: d["devices"][0]["profile"].__setitem__("batch_sizes", [1, "2"]), "batch_sizes must be integers"),
])
def test_bad_problem_files_name_the_field(tmp_path, edit, message):
    out = run(_broken(tmp_path, edit))
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_bad_arguments_and_unreadable_files(tmp_path):
    (tmp_path / "x.json").write_text("{")
    out = run(tmp_path / "x.json")
    assert out.returncode == 2 and "is not valid JSON" in out.stderr
    assert "does not exist" in run(tmp_path / "none.json").stderr
    bad = run(EXAMPLES / "digits-cpu.json", "--devices", "cpu-1t=lots")
    assert bad.returncode == 2 and "--devices: expected name=count pairs, got 'cpu-1t=lots'" in bad.stderr
    assert run(EXAMPLES / "digits-cpu.json", "--devices", "tpu=3").returncode == 2
    assert run(EXAMPLES / "digits-cpu.json", "--frobnicate").returncode == 2


def test_json_output_is_standard_json(tmp_path):
    """No Infinity or NaN literals: a strict parser reads every --json answer, feasible or not."""
    def strict(name):
        raise ValueError(f"{name} in --json output")
    for path in (EXAMPLES / "digits-cpu.json", _broken(tmp_path, lambda d: d.update(slo_ms=0.5, slack_ms=0.1))):
        out = run(path, "--json")
        assert out.returncode in (0, 1), out.stderr
        json.loads(out.stdout, parse_constant=strict)
