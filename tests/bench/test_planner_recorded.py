"""bench/planner_recorded.py: timing the planner's options on the problems a goodput run recorded."""
import json
from pathlib import Path

import pytest

from bench import planner_recorded as pr
from e3.planner.solve import solve
from e3.planner.problem import Problem

RUN = Path(__file__).resolve().parents[2] / "bench" / "results" / "goodput_cpu-full.json"


def one_run(tmp_path: Path) -> tuple[Path, dict]:
    run = json.loads(RUN.read_text())["runs"][0]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"runs": [run, {"model": "no problem recorded"}]}))
    return path, run


def test_it_times_each_recorded_problem_and_reports_the_plan_the_dp_finds(tmp_path):
    path, run = one_run(tmp_path)
    assert pr.main(["--run", str(path), "--repeats", "2", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    (row,) = result["rows"]
    plan = solve(Problem.from_json(run["problem"])).plan
    assert row["plan"] == {"splits": plan.splits, "batch": plan.batch, "goodput": round(plan.goodput, 1)}
    assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
    assert f"| {run['model']} | {run['workers']} | {run['mix']} |" in (tmp_path / "out.md").read_text()


@pytest.mark.parametrize("content,message", [("not json", "not a goodput run"),
                                             ('{"runs": [{"model": "x"}]}', "records no planner problems")])
def test_a_run_file_it_cannot_use_is_refused_by_name(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        pr.main(["--run", str(bad)])
    assert e.value.code == 2 and message in capsys.readouterr().err
