"""The root config: per-area dataclasses, validation that quotes the bad value."""
import json

import pytest

from e3.runtime.config import E3Config
from e3.runtime.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    c = E3Config().validate()
    assert E3Config.from_dict(c.to_dict()).to_dict() == c.to_dict()
    assert c.server.host == "127.0.0.1"


@pytest.mark.parametrize("data,message", [
    ({"batching": {"slo_ms": -1}}, "batching.slo_ms must lie in (0, 60000], got -1"),
    ({"batching": {"slo_reserve": 0.95}}, "batching.slo_reserve must lie in [0, 0.9], got 0.95"),
    ({"batching": {"timeout_ms": 50}}, "batching.timeout_ms must lie in [slo_ms, 600000], got 50"),
    ({"workers": {"mode": "threads"}}, "workers.mode must be 'process' or 'inline', got 'threads'"),
    ({"workers": {"devices": ["tpu:0"]}}, "workers.devices must be a non-empty list"),
    ({"workers": {"cpu_workers": 0}}, "workers.cpu_workers must be an integer in 1..1024, got 0"),
    ({"server": {"port": 70000}}, "server.port must be in 0..65535, got 70000"),
    ({"server": {"max_inputs": 2000}}, "server.max_inputs (2000) must not exceed batching.max_queue (1024)"),
    ({"replan": {"batch_sizes": []}}, "replan.batch_sizes must be a non-empty list"),
    ({"batching": {"slo": 1}}, "unknown setting batching.slo"),
    ({"planner": {}}, "unknown config section 'planner'"),
    ({"model": 3}, "config section 'model' must be an object, got 3"),
    ({"cluster": {"join": "http://c:1"}}, "cluster.join ('http://c:1') needs cluster.token_file"),
    ({"cluster": {"token_file": "t", "join": "c:1"}}, "cluster.join must be the coordinator's http://HOST:PORT"),
    ({"cluster": {"lease_s": 1.0}}, "cluster.lease_s (1.0) must be at least twice cluster.heartbeat_s (1.0)"),
    ({"cluster": {"heartbeat_s": 0}}, "cluster.heartbeat_s must lie in (0, 3600], got 0"),
    ({"cluster": {"link_credits": 0}}, "cluster.link_credits must be an integer in 1..4096, got 0"),
    ({"cluster": {"max_frame_bytes": 10}}, "cluster.max_frame_bytes must be an integer in 65536..2147483648, got 10"),
    ({"cluster": {"join_attempts": "3"}}, "cluster.join_attempts must be an integer, got '3'"),
    ({"cluster": {"split_hosts": [[]]}}, "cluster.split_hosts must be a list (per split) of non-empty lists"),
    ({"cluster": {"token_file": "t", "split_hosts": [["a"], ["b"]]}, "replan": {"enabled": False}},
     "cluster.split_hosts names hosts for 2 splits; it needs batching.cuts with one cut fewer, got cuts None"),
    ({"llm": {"kv_mode": "fast"}}, "llm.kv_mode must be 'copy' or 'exact', got 'fast'"),
    ({"llm": {"token_deadline_ms": 0}}, "llm.token_deadline_ms must lie in (0, 600000] or be null, got 0"),
    ({"llm": {"token_deadline_ms": "5"}}, "llm.token_deadline_ms must lie in (0, 600000] or be null, got '5'"),
    ({"llm": {"drain_timeout_s": -1}}, "llm.drain_timeout_s must lie in [0, 3600], got -1"),
    ({"llm": {"kv_slots": 0}}, "llm.kv_slots must be at least 1, got 0"),
    ({"llm": {"split_layers": [9, 6]}}, "llm.split_layers must be increasing layer counts (>= 1) or null, got [9, 6]"),
    ({"llm": {"merge_rows": 0}}, "llm.merge_rows must be a positive integer or null, got 0"),
])
def test_bad_values_are_quoted(data, message):
    with pytest.raises(ConfigError) as exc:
        E3Config.from_dict(data)
    assert message in str(exc.value)


@pytest.mark.parametrize("data,message", [
    ({"batching": {"slo_ms": "100"}}, "batching.slo_ms must be a number, got '100'"),
    ({"batching": {"timeout_ms": None}}, "batching.timeout_ms must be a number, got None"),
    ({"batching": {"max_queue": 64.0}}, "batching.max_queue must be an integer, got 64.0"),
    ({"batching": {"batch": True}}, "batching.batch must be an integer in 1..4096 or null, got True"),
    ({"workers": {"cpu_workers": True}}, "workers.cpu_workers must be an integer, got True"),
    ({"workers": {"start_timeout_s": "60"}}, "workers.start_timeout_s must be a number, got '60'"),
    ({"workers": {"batch_timeout_s": float("inf")}}, "workers.batch_timeout_s must be a number, got inf"),
    ({"workers": {"hedge": 1}}, "workers.hedge must be true or false, got 1"),
    ({"workers": {"hedge_factor": 0.5}}, "workers.hedge_factor must be >= 1, got 0.5"),
    ({"workers": {"hedge_floor_s": 10.0}}, "workers.hedge_floor_s must lie in (0, batch_timeout_s), got 10.0"),
    ({"batching": {"max_queue_delay_ms": float("nan")}}, "batching.max_queue_delay_ms must lie in"),
    ({"server": {"port": "8000"}}, "server.port must be an integer, got '8000'"),
    ({"replan": {"interval_s": [2]}}, "replan.interval_s must be a number, got [2]"),
    ({"replan": {"utilisation": False}}, "replan.utilisation must be a number, got False"),
    ({"replan": {"batch_sizes": [1, True]}}, "replan.batch_sizes must be a non-empty list of integers"),
    ({"model": {"threshold": "0.2"}}, "model.threshold must be a number, got '0.2'"),
])
def test_wrong_types_are_config_errors(data, message):
    """A string or bool where a number belongs: a ConfigError quoting it, never a TypeError from a comparison."""
    with pytest.raises(ConfigError) as exc:
        E3Config.from_dict(data)
    assert message in str(exc.value)


def test_files(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batching": {"batch": 16}}))
    assert E3Config.from_file(path).batching.batch == 16
    path.write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        E3Config.from_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        E3Config.from_file(tmp_path / "none.json")


def test_a_cluster_member_and_coordinator_validate():
    member = E3Config.from_dict({"cluster": {"token_file": "t", "join": "http://10.0.0.1:8000"}})
    assert member.cluster.enabled and member.replan.enabled      # a member does not plan
    coordinator = E3Config.from_dict({"cluster": {"token_file": "t", "split_hosts": [["local"], ["10.0.0.2"]]},
                                      "batching": {"cuts": [0]}, "replan": {"enabled": False}})
    assert coordinator.cluster.enabled and coordinator.cluster.join is None
