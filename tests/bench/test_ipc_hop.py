"""The ipc_hop benchmark runs end to end on this machine and records what it measured."""
import json

import torch

from bench import ipc_hop


def test_a_short_run_writes_every_batch_and_names_the_missing_gpu(tmp_path):
    out = tmp_path / "ipc_hop"
    threads = torch.get_num_threads()
    assert ipc_hop.main(["--batches", "1,3", "--repeats", "3", "--warmup", "1", "--seq", "4", "--hidden", "8",
                         "--cpu", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads      # the caller's torch settings are left alone
    record = json.loads((tmp_path / "ipc_hop_cpu.json").read_text())
    assert record["device"] == "cpu" and record["command"].startswith("python3 -m bench.ipc_hop --batches 1,3")
    assert [r["batch"] for r in record["rows"]] == [1, 3]
    assert [r["bytes"] for r in record["rows"]] == [4 * 8 * 4 + 4 * 8, 3 * (4 * 8 * 4 + 4 * 8)]
    assert all(r["shm"]["median_us"] > 0 and r["cuda"] in (ipc_hop.NO_GPU, ipc_hop.SKIPPED_GPU)
               for r in record["rows"])
    assert "| 3 | 0.00 |" in (tmp_path / "ipc_hop_cpu.md").read_text()
