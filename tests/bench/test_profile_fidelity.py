"""bench/profile_fidelity.py: the profile's price of a split, argument errors, and one tiny real run."""
import json

import pytest

from bench import profile_fidelity
from e3.planner.profiles import DeviceProfile


def test_a_split_is_priced_as_its_blocks_plus_the_exit_at_its_end():
    prof = DeviceProfile("cpu", [1, 4], [[1e-3, 2e-3], [3e-3, 5e-3], [7e-3, 9e-3]], [[0.1e-3, 0.2e-3]] * 2,
                         [0.5e-3, 0.6e-3], 0.0, 0.0)
    assert profile_fidelity.profile_s(prof, 0, 0, 4, False) == pytest.approx(2e-3 + 0.2e-3)
    assert profile_fidelity.profile_s(prof, 1, 2, 1, True) == pytest.approx(3e-3 + 7e-3 + 0.5e-3)


def test_bad_arguments_are_refused():
    for argv in (["--rows", "1,x"], ["--rows", "0"], ["--threads", "0"], ["--model", "resnet"]):
        with pytest.raises(SystemExit):
            profile_fidelity.parse_args(argv)


@pytest.mark.slow
def test_it_runs_on_digits_with_tiny_settings(e3_cache, tmp_path):
    assert profile_fidelity.main(["--model", "digits", "--rows", "1,2", "--repeats", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "profile_fidelity_digits.json").read_text())
    assert len(data["splits"]) == 6 and all(r["executor_ms"] > 0 and r["ratio"] > 0 for r in data["splits"])
    assert "executor / profile" in (tmp_path / "profile_fidelity_digits.md").read_text()
