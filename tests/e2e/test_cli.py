"""`bin/e3-node` as a user runs it: a real process, a real port, signals."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.procs import live_processes, stop_node

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
# gRPC off: these tests speak HTTP, and must not fail where port 8001 is taken (test_grpc.py covers it).
NODE = [sys.executable, str(ROOT / "bin" / "e3-node"), "--grpc-port", "0"]


def test_help_is_instant_and_clear():
    out = subprocess.run(NODE + ["--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout and "127.0.0.1" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' is not a directory"),
    (["--port", "70000"], "server.port must be in 0..65535, got 70000"),
    (["--config", "/nonexistent.json"], "config file '/nonexistent.json' does not exist"),
    (["--cuts", "0,x"], "--cuts takes comma-separated block numbers, got '0,x'"),
    (["--cuts", "99"], "cut points [99] lie outside blocks 0..4"),
    (["--inline", "--workers", "3"], "--workers and --threads size worker processes; --inline runs one"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, tmp_path):
    env = {**os.environ, "E3_CACHE": str(tmp_path)}
    digits = [] if "--model" in args else ["--model", "digits"]
    out = subprocess.run(NODE + digits + args + ["--no-replan"] + ([] if "--port" in args else ["--port", "0"]),
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("token, args, message", [
    (None, ["--no-replan"], "cluster token file '{path}' does not exist"),
    ("", ["--no-replan"], "cluster token file '{path}' is empty"),
    ("0123456789abcdef0123", ["--no-replan"], "is open to other users (mode 0644); make it owner-only: chmod 600"),
    ("0123456789abcdef0123", ["--join", "http://127.0.0.1:9", "--host", "127.0.0.2"],
     "is open to other users (mode 0644)"),
    ("0123456789abcdef0123", ["--join", "127.0.0.1:9"], "cluster.join must be the coordinator's http://HOST:PORT"),
])
def test_a_bad_cluster_token_file_or_setting_exits_2_before_anything_starts(tmp_path, token, args, message):
    path = tmp_path / "token"
    if token is not None:
        path.write_text(token)
        os.chmod(path, 0o644 if token else 0o600)
    out = subprocess.run(NODE + ["--model", "digits", "--port", "0", "--cluster-token-file", str(path)] + args,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "E3_CACHE": str(tmp_path)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert message.format(path=path) in out.stderr and "Traceback" not in out.stderr
    assert "serving" not in out.stdout


def test_a_member_without_its_coordinator_stops_after_bounded_retries(tmp_path, default_dir):
    path = tmp_path / "token"
    path.write_text("0123456789abcdef0123")
    os.chmod(path, 0o600)
    config = tmp_path / "member.json"
    config.write_text(json.dumps({"cluster": {"join_attempts": 3, "retry_delay_s": 0.1}}))
    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(NODE + ["--model", "digits", "--join", f"http://127.0.0.1:{port}", "--host", "127.0.0.2",
                                 "--cluster-token-file", str(path), "--config", str(config)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "E3_CACHE": str(Path(default_dir).parents[1])})
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"the coordinator at http://127.0.0.1:{port} cannot be reached (3 attempts" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("joining") <= 3


def test_a_wrongly_typed_config_value_exits_2_with_a_message(tmp_path):
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"batching": {"slo_ms": "100"}}))
    out = subprocess.run(NODE + ["--config", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "e3-node: error: batching.slo_ms must be a number, got '100'" in out.stderr
    assert "Traceback" not in out.stderr


def test_serves_the_digits_model_and_stops_cleanly_on_sigterm(default_dir):
    env = {**os.environ, "E3_CACHE": str(Path(default_dir).parents[1])}
    proc = subprocess.Popen(NODE + ["--model", "digits", "--port", "0", "--workers", "2", "--no-replan"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines, url = [], None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"serving model '([^']+)' on (http://127\.0\.0\.1:\d+)", line):
                name, url = m.groups()
            if "Ctrl-C stops it" in line:
                break
        assert url, "".join(lines)
        text = "".join(lines)
        assert "example queries over HTTP" in text and "predicted" in text
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=10) as resp:
            assert json.load(resp) == {"ready": True}
        curl = next(l for l in lines if l.strip().startswith("curl"))
        body = curl.split("-d '", 1)[1].rsplit("'", 1)[0]
        req = urllib.request.Request(f"{url}/v2/models/{name}/infer", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.load(resp)
        assert {t["name"] for t in answer["outputs"]} >= {"label", "exit_point"}
    finally:
        rest, _ = stop_node(proc, signal.SIGTERM, 60)
    assert proc.returncode == 0, rest
    assert "stopped" in rest


def _leftovers(pid: int) -> tuple[list[str], list[int]]:
    """Ring files named after node `pid`, and the live processes (its workers) of the group it led."""
    from e3.runtime.slots import _shm_root
    files = sorted(p.name for p in _shm_root().glob(f"e3-{pid}-*"))
    live = [p for p, _, group, _ in live_processes() if group == pid]
    return files, live


def _node(args: list[str], env: dict) -> subprocess.Popen:
    # A session of its own: the node leads a process group that its workers join.
    return subprocess.Popen(NODE + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_a_taken_port_exits_2_and_cleans_up(default_dir):
    env = {**os.environ, "E3_CACHE": str(Path(default_dir).parents[1])}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _node(["--model", "digits", "--port", str(port), "--workers", "1", "--no-replan", "--no-demo-query"], env)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    assert f"e3-node: error: cannot listen on 127.0.0.1:{port}: address already in use" in err, err
    assert "Traceback" not in out + err
    assert _leftovers(proc.pid) == ([], [])


def test_ctrl_c_while_starting_stops_cleanly(default_dir):
    env = {**os.environ, "E3_CACHE": str(Path(default_dir).parents[1])}
    proc = _node(["--model", "digits", "--port", "0", "--workers", "1", "--no-replan", "--no-demo-query"], env)
    assert "starting" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)     # loading the model and starting its worker take longer than this
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "SIGINT while starting" in out and "stopped" in out and "serving" not in out
    assert "Traceback" not in out + err
    assert _leftovers(proc.pid) == ([], [])


def test_the_default_node_replans_with_its_forecast_process(default_dir, tmp_path):
    """Re-planning on, as the README's first command runs it: the forecast process fits each
    interval, and starting it never re-runs bin/e3-node (multiprocessing's spawn did: every
    forecast process began a second node, which failed on the taken port)."""
    env = {**os.environ, "E3_CACHE": str(Path(default_dir).parents[1])}
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps({"replan": {"interval_s": 0.5}}))
    proc = _node(["--model", "digits", "--port", "0", "--workers", "1", "--no-demo-query", "--config", str(cfg)],
                 env)
    seen = []
    try:
        url = None
        for line in iter(proc.stdout.readline, ""):
            seen.append(line)
            if m := re.search(r"on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
            if "Ctrl-C stops it" in line:
                break
        assert url
        deadline, view = time.monotonic() + 60, {}
        while time.monotonic() < deadline and not (view.get("planner") or {}).get("forecast"):
            time.sleep(0.5)
            with urllib.request.urlopen(f"{url}/e3/plan", timeout=10) as resp:
                view = json.load(resp)
        time.sleep(1.5)                    # a few more intervals, each with a fit
    finally:
        out, err = stop_node(proc, signal.SIGTERM, 60)
    assert view["planner"]["forecast"]["method"] in ("prior", "moving-average", "arima"), view
    out = "".join(seen) + out
    assert proc.returncode == 0, out + err
    assert out.count("e3-node: starting") == 1, out
    assert "tick failed" not in err and "Traceback" not in err, err
    assert _leftovers(proc.pid) == ([], [])


@pytest.mark.slow
def test_the_default_node_plans_splits_and_its_demo_shows_an_early_exit(minilm_dir):
    """The README's first command: `bin/e3-node` serves the default model on a plan of two or more
    splits, and its demo query shows inputs leaving at a ramp. The SLO is twice the default
    100 ms: on 2 cores MiniLM at batch 1 takes 30-40 ms, so whether any plan meets 100 ms (two batch
    times per split, by the cost model) depends on the machine's speed; this checks the mechanism."""
    env = {**os.environ, "E3_CACHE": str(Path(minilm_dir).parents[1])}
    # its log goes to a file: a pipe nobody reads until the end could fill and stall the node
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(NODE + ["--port", "0", "--slo-ms", "200"], stdout=subprocess.PIPE, stderr=log,
                                text=True, env=env, start_new_session=True)
        lines = []
        try:
            for line in iter(proc.stdout.readline, ""):
                lines.append(line)
                if "Ctrl-C stops it" in line:
                    break
        finally:
            out, _ = stop_node(proc, signal.SIGTERM, 120)
        log.seek(0)
        err = log.read()
    text = "".join(lines)
    said = text + out + "\n-- its log --\n" + err
    assert proc.returncode == 0, said
    served = re.search(r"serving model 'minilm-fortunes' .*splits (\[\[.*\]\])\)", text)
    assert served, said
    assert len(json.loads(served.group(1))) >= 2, said
    assert "planner chose splits" in text, said
    assert re.search(r"input \d+: predicted '\w+' \(true: \w+\), left at ramp \d", text), said
    assert "Traceback" not in err, said
