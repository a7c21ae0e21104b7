"""The benchmark report: verdicts against the targets, and the README section it rewrites."""

import pytest

from bench import report


def run(mix, e3, ee_batch, stock, oracle, acc=(0.90, 0.905), spread=None, predicted=None):
    """One run in summary form; `spread`: per system (min, max) over repeats."""
    g = {"stock": stock, "ee-batch": ee_batch, "ee-1": 10.0, "e3": e3, "oracle": oracle}
    ratio = lambda a, b: round(g[a] / g[b], 3)
    out = {"model": "m", "workers": "1 x 2 threads", "mix": mix, "goodput": g,
           "accuracy": {"e3": acc[0], "ee-batch": acc[1], "stock": 0.9, "ee-1": 0.9},
           "ratios": {"e3/ee-batch": ratio("e3", "ee-batch"), "e3/stock": ratio("e3", "stock"),
                      "e3/oracle": ratio("e3", "oracle")}}
    if spread:
        out["goodput_range"] = {k: {"median": g[k], "min": lo, "max": hi, "each": [lo, g[k], hi]}
                                for k, (lo, hi) in spread.items()}
        out["ratio_ranges"] = {f"e3/{b}": {"median": ratio("e3", b), "low": round(spread["e3"][0] / spread[b][1], 3),
                                           "high": round(spread["e3"][1] / spread[b][0], 3)}
                               for b in ("ee-batch", "stock")}
    if predicted:
        out["predicted_goodput"] = predicted
    return out


SPREAD = {"e3": (280, 320), "ee-batch": (140, 160), "stock": (240, 260)}


def test_targets_say_met_or_missed_from_the_measured_ranges():
    lines = report.targets([run("80:20", 300, 150, 250, 320, spread=SPREAD, predicted={"e3": 330}),
                            run("20:80", 90, 80, 100, 120, acc=(0.8, 0.9), predicted={"e3": 150})])
    text = "\n".join(lines)
    assert "80:20 (1 x 2 threads): e3/ee-batch = 2.0 [1.75, 2.286] (target >= 1.5 at the low end): met" in text
    assert "80:20 (1 x 2 threads): e3/stock = 1.2 [1.077, 1.333] (target >= 1.3 at the low end): MISSED" in text
    assert "20:80 (1 x 2 threads): e3 90 vs the better of stock and ee-batch 100 = 0.900 (target >= 0.95): MISSED" in text
    assert "80:20 (1 x 2 threads): e3 300 vs the better of stock and ee-batch 250 = 1.200 (target >= 0.95): met" in text
    assert "e3 predicted 330 vs measured 300 req/s: off by 10% (target within 20%): met" in text
    assert "e3 predicted 150 vs measured 90 req/s: off by 67% (target within 20%): MISSED" in text
    assert "20:80 (1 x 2 threads): e3/oracle = 0.75 (target >= 0.85): MISSED" in text
    assert "20:80: accuracy e3 80.0% vs ee-batch 90.0% (target within 1 point): MISSED" in text


def test_a_single_repeat_has_no_range_to_judge_the_low_end_by():
    text = "\n".join(report.targets([run("80:20", 300, 150, 250, 320)]))
    assert "e3/ee-batch = 2.0 (one repeat; target >= 1.5 at the low end): n/a" in text


def test_readme_section_is_replaced_from_the_summary(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\noutro\n")
    summary = {"cpu": {"machine": "test box", "date": "today", "command": "bin/e3-bench",
                       "runs": [run("80:20", 300, 150, 250, 320, spread=SPREAD, predicted={"e3": 330})]}}
    report.update_readme(readme, summary)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert ("| m | 1 x 2 threads | 80:20 | 250 [240–260] | 150 [140–160] | 10 | 300 [280–320] (pred. 330) | "
            "320 (bound) | 2.0 [1.75–2.286] | 1.2 [1.077–1.333] | 0.938 |") in text
    assert report.TABLE_NOTE in text


def test_a_readme_without_the_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no <!-- goodput:begin -->"):
        report.update_readme(readme, {})


def test_cli_names_an_unreadable_summary(tmp_path, capsys):
    assert report.main(["--readme", str(tmp_path / "R.md"), "--summary", str(tmp_path / "none.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_switching_report_lists_each_change_of_decision_once():
    from bench.report import _decisions
    samples = [{"t": 0.5, "splits": [[0, 5]], "solve": None, "decision": None},
               {"t": 1.0, "splits": [[0, 5]], "solve": "start", "decision": "applied", "forecast": [0.8]},
               {"t": 1.5, "splits": [[0, 5]], "solve": "start", "decision": "applied", "forecast": [0.8]},
               {"t": 12.0, "splits": [[0, 0], [1, 5]], "solve": "timer", "decision": "applied", "forecast": [0.2]},
               {"t": 30.0, "splits": [[0, 0], [1, 5]], "solve": "timer",
                "decision": "held: last switch 2.0 s ago (hold 10 s)", "forecast": [0.5]}]
    lines = _decisions(samples)
    assert len(lines) == 4 and lines[-1] == ""
    assert lines[1].startswith("- t = 12 s: solve on timer, applied; splits [[0, 0], [1, 5]]")
    assert "held" in lines[2] and "[0.5]" in lines[2]
    assert _decisions(samples[:1]) == []
