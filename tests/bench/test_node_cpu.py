"""bench/node_cpu.py: the line fit, and one tiny run against a real node so CI keeps it working."""
import json

import pytest

from bench import node_cpu
from e3.models.registry import resolve


def test_the_line_splits_cpu_into_a_fixed_share_and_a_cost_per_request():
    points = [(0.0, 0.05), (100.0, 0.10), (400.0, 0.25)]          # 0.05 cores + 0.5 ms per request
    fixed, slope = node_cpu.fit_line(points)
    assert fixed == pytest.approx(0.05) and slope == pytest.approx(0.0005)
    assert node_cpu.fit_line([(100.0, 0.1), (100.0, 0.2)]) is None   # one rate: no line


def test_bad_rates_are_refused_with_the_value():
    with pytest.raises(SystemExit):
        node_cpu.parse_args(["--rates", "0,x"])
    with pytest.raises(SystemExit):
        node_cpu.parse_args(["--rates", "0"])


@pytest.mark.e2e
@pytest.mark.slow
def test_node_cpu_runs_end_to_end_with_tiny_settings(e3_cache, tmp_path):
    resolve("digits")
    assert node_cpu.main(["--rates", "0,40", "--phase-s", "1.5", "--repeats", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "node_cpu_digits.json").read_text())
    idle, loaded = data["phases"]
    assert idle["answered_per_s"] == 0 and loaded["answered_per_s"] > 10
    assert loaded["cores"] > idle["cores"] >= 0
    assert "cores fixed +" in (tmp_path / "node_cpu_digits.md").read_text()
