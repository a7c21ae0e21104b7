"""The link_hop benchmark: a short real run between two processes over the link, and its checks."""
import json

import pytest
import torch

from bench import ipc_hop, link_hop
from e3.models.state import BatchState


@pytest.mark.slow
def test_a_short_run_moves_every_size_intact_and_records_both_paths(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "link_hop"
    assert link_hop.main(["--rows", "1,3", "--models", "a=8,b=16", "--seq", "4", "--hops", "4", "--warmup", "1",
                          "--rounds", "2", "--stream", "6", "--window", "2", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads          # the caller's torch settings are left alone
    record = json.loads((tmp_path / "link_hop_cpu.json").read_text())
    assert record["command"].startswith("python3 -m bench.link_hop --rows 1,3")
    assert [(r["model"], r["rows"]) for r in record["rows"]] == [("a", 1), ("a", 3), ("b", 1), ("b", 3)]
    # per row: hidden [4, H] float32 + mask [4] int64, as the BERT family's boundary
    assert [r["bytes"] for r in record["rows"]] == [n * (4 * h * 4 + 4 * 8) for h in (8, 16) for n in (1, 3)]
    for r in record["rows"]:
        assert r["intact"] is True
        for key in ("shm_rtt_us", "link_rtt_us", "link_oneway_us", "link_rtt_p99_us", "link_mbps_window"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"], (key, r[key])
        assert r["link_oneway_us"]["median"] < r["link_rtt_us"]["median"] + 1     # a part of the round trip
        assert 0 < r["link_over_shm"]["min"] <= r["link_over_shm"]["median"] <= r["link_over_shm"]["max"]
    assert record["fit_oneway"]["transfer_fixed_s"] >= 0 and record["fit_oneway"]["transfer_s_per_byte"] >= 0
    assert record["goal"] is None                       # no 64-row MiniLM size in this run
    assert "| a | 3 | 0.00 |" in (tmp_path / "link_hop_cpu.md").read_text()


def test_rows_that_came_back_changed_are_told_apart_from_intact_ones():
    spec = ipc_hop.state_spec(4, 8)
    sent = ipc_hop.batch_state(spec, 3, "cpu")
    same = [t.clone() for _, t in sent.items()]
    assert link_hop.same_rows(sent, same)
    flipped = [t.clone() for t in same]
    flipped[0].view(torch.uint8).reshape(-1)[5] ^= 1           # one bit of one float
    assert not link_hop.same_rows(sent, flipped)
    assert not link_hop.same_rows(sent, same[:1])               # a field missing
    assert not link_hop.same_rows(sent, [same[0], same[1].to(torch.int32)])
    assert not link_hop.same_rows(BatchState({"hidden": same[0][:2], "mask": same[1][:2]}), same)


@pytest.mark.parametrize("argv,needle", [(["--rows", "0,4"], "1 or more"), (["--rows", "x"], "whole numbers"),
                                         (["--models", "gpt"], "unknown model 'gpt'"), (["--hops", "0"], ">= 1"),
                                         (["--warmup", "-1"], "--warmup")])
def test_bad_arguments_stop_with_a_message_naming_them(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        link_hop.main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_quick_takes_fewer_hops_and_never_writes_over_the_full_record():
    quick, out = link_hop.parse(["--quick"])
    full, full_out = link_hop.parse([])
    assert (quick.hops, quick.stream) == (link_hop.QUICK["hops"], link_hop.QUICK["stream"])
    assert quick.hops < full.hops and quick.stream < full.stream
    assert quick.rows == full.rows == [1, 4, 16, 64] and quick.models == {"minilm": 384, "bert-base": 768}
    assert out != full_out and full_out.name == "link_hop"
