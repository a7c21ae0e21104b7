"""The benchmark's systems as real e3-node processes, loaded by the real load generator."""
import pytest

from bench.goodput import loadgen, write_inputs
from bench.nodes import SYSTEMS, Node, mean_rows, node_config
from bench.workloads import load_pools
from e3.runtime.config import E3Config


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_system_is_a_valid_node_config(system):
    cfg = E3Config.from_dict(node_config(system, "digits", [0, 1, 2, 3], batch=8, slo_ms=100, workers=1,
                                         threads=1, port=0))
    assert cfg.replan.enabled == (system == "e3")
    if system != "e3":
        assert cfg.batching.sample_fraction == 0.0
    assert cfg.batching.rebatch == (system != "ee-batch")


def test_unknown_system_is_refused():
    with pytest.raises(ValueError, match="unknown system 'fast'"):
        node_config("fast", "digits", [0], batch=8, slo_ms=100, workers=1, threads=1, port=0)


async def test_ee_batch_node_answers_the_generator_on_the_mix(default_dir, tmp_path):
    pools = load_pools("digits")
    picks = pools.mix(0.8, 200, seed=3)
    path = write_inputs(pools, picks, tmp_path / "inputs.json")
    cfg = node_config("ee-batch", str(default_dir), pools.ramp_blocks, batch=8, slo_ms=200, workers=1,
                      threads=1, port=0)
    from bench.nodes import free_port
    cfg["server"]["port"] = free_port()
    async with Node(cfg, tmp_path / "node.log") as node:
        before = await node.batch_rows()
        r = await loadgen(node.url, node.model_name, path, rate=60, duration_s=2, slo_ms=1000, seed=1)
        rows = mean_rows(before, await node.batch_rows())
    assert r["sent"] > 60 and r["statuses"] == {"200": r["sent"]}
    assert r["agree"] >= 0.9 * r["ok"] and r["correct"] >= 0.9 * r["labelled"]
    assert set(rows) == {"0", "1", "2", "3", "4"}, "every ramp ends a split"
    assert max(rows.values()) <= 8 and rows["4"] <= rows["0"], rows
    assert 0.7 <= r["exits"].get("0", 0) / r["ok"] <= 0.9, "80% easy inputs leave at the first ramp"
