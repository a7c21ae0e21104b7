"""`bin/e3-plan` as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAN = [sys.executable, str(ROOT / "bin" / "e3-plan")]
EXAMPLES = ROOT / "planner" / "examples"


def run(*args):
    return subprocess.run(PLAN + [str(a) for a in args], capture_output=True, text=True, timeout=120)


def test_examples_solve():
    out = run(EXAMPLES / "digits-cpu.json")
    assert out.returncode == 0, out.stderr
    assert "predicted goodput" in out.stdout and "binding:" in out.stdout
    out = run(EXAMPLES / "capacity-hetero.json", "--json")
    result = json.loads(out.stdout)
    assert result["feasible"] and result["plan"]["goodput"] >= 60000


def test_infeasible_problem_says_why(tmp_path):
    out = run(_broken(tmp_path, lambda d: d.update(slo_ms=0.5, slack_ms=0.1)))
    assert out.returncode == 1 and "no plan meets the SLO" in out.stdout


def _broken(tmp_path, edit):
    data = json.loads((EXAMPLES / "digits-cpu.json").read_text())
    edit(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.__setitem__("survival", [0.5, 0.7, 0.1, 0.0]), "survival: expected non-increasing"),
    (lambda d: d.__setitem__("survival", [0.5]), "survival: expected 4 fractions"),
    (lambda d: d["model"].__setitem__("ramp_blocks", [0, 9]), "ramp_blocks: expected increasing block indices"),
    (lambda d: d.__setitem__("objective", "speed"), "objective: expected 'goodput' or 'cost', got 'speed'"),
    (lambda d: d.__setitem__("objective", "cost"), "rate: expected a positive request rate"),
    (lambda d: d["devices"][0].__setitem__("count", "two"), "devices[0].count: expected an integer, got 'two'"),
    (lambda d: d["devices"][0]["profile"].__setitem__("head_s", [1]), "head_s[0] must hold 7"),
    (lambda d: d.pop("model"), "model: expected a value (the field is missing)"),
    (lambda d: d.__setitem__("slo", 3), "slo: expected a known field"),
])
def test_bad_problem_files_name_the_field(tmp_path, edit, message):
    out = run(_broken(tmp_path, edit))
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_unreadable_files(tmp_path):
    (tmp_path / "x.json").write_text("{")
    assert "is not valid JSON" in run(tmp_path / "x.json").stderr
    assert "does not exist" in run(tmp_path / "none.json").stderr
