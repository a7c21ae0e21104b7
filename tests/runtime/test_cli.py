"""`bin/e3-node`'s options for a causal LM (build_config): what applies, and a clear error for the rest."""
from __future__ import annotations

import gc

import pytest

from e3.runtime.cli import build_config, parse_args
from e3.runtime.heap import freeze_heap
from e3.runtime.errors import ConfigError


def test_the_lm_options_reach_the_llm_config():
    c = build_config(parse_args(["--model", "gemma3-270m", "--threads", "1", "--kv-mode", "exact", "--no-exits",
                                 "--port", "0", "--host", "127.0.0.2"]))
    assert (c.model.path, c.llm.threads, c.llm.kv_mode, c.llm.use_exits) == ("gemma3-270m", 1, "exact", False)
    assert (c.server.host, c.server.port, c.server.grpc_port) == ("127.0.0.2", 0, 0)


@pytest.mark.parametrize("args,message", [
    (["--model", "gemma3-270m", "--cuts", "0"], "--cuts size or plan the classifier pipeline"),
    (["--model", "gemma3-270m", "--workers", "2", "--batch", "4"], "--workers, --batch size or plan"),
    (["--model", "gemma3-270m", "--grpc-port", "9001"], "the causal LM node serves HTTP only"),
    (["--model", "digits", "--kv-mode", "copy"], "--kv-mode and --no-exits apply to the causal LM"),
])
def test_options_that_do_not_apply_are_refused(args, message):
    with pytest.raises(ConfigError) as exc:
        build_config(parse_args(args))
    assert message in str(exc.value)


def test_the_started_heap_is_frozen_out_of_full_collections():
    """What start-up allocated is frozen, so a full collection walks only what came after."""
    before = gc.get_freeze_count()
    kept = [[i] for i in range(10000)]            # long-lived objects a node holds from start-up
    try:
        freeze_heap()
        assert gc.get_freeze_count() >= before + len(kept)
    finally:
        gc.unfreeze()


def test_a_config_file_may_leave_to_the_flags_what_it_needs(tmp_path):
    """The file is validated with the flags applied: split_hosts in the file, --cuts on the command
    line (each alone would be refused); a bad value in the file is still named."""
    import json
    path = tmp_path / "coordinator.json"
    path.write_text(json.dumps({"cluster": {"split_hosts": [["127.0.0.2"], ["127.0.0.3"]]}}))
    config = build_config(parse_args(["--config", str(path), "--cuts", "0", "--no-replan",
                                      "--cluster-token-file", str(tmp_path / "t")]))
    assert config.batching.cuts == [0] and config.cluster.split_hosts == [["127.0.0.2"], ["127.0.0.3"]]
    with pytest.raises(ConfigError) as exc:
        build_config(parse_args(["--config", str(path), "--no-replan", "--cluster-token-file", str(tmp_path / "t")]))
    assert "needs batching.cuts" in str(exc.value)
    path.write_text(json.dumps({"batching": {"slo_ms": -5}}))
    with pytest.raises(ConfigError) as exc:
        build_config(parse_args(["--config", str(path)]))
    assert "batching.slo_ms" in str(exc.value) and "-5" in str(exc.value)


def test_observe_pins_the_plan_and_keeps_the_planner():
    c = build_config(parse_args(["--model", "digits", "--cuts", "0,2", "--batch", "4", "--observe"]))
    assert (c.replan.enabled, c.replan.observe, c.batching.cuts, c.batching.batch) == (True, True, [0, 2], 4)
    with pytest.raises(ConfigError) as exc:
        build_config(parse_args(["--model", "digits", "--observe", "--no-replan"]))
    assert "--observe" in str(exc.value) and "--no-replan" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        build_config(parse_args(["--model", "gemma3-270m", "--observe"]))
    assert "--observe" in str(exc.value)
