"""`bin/e3-node` as a user runs it: a real process, a real port, signals."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
NODE = [sys.executable, str(ROOT / "bin" / "e3-node")]


def test_help_is_instant_and_clear():
    out = subprocess.run(NODE + ["--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout and "127.0.0.1" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' is not a directory"),
    (["--port", "70000"], "server.port must be in 0..65535, got 70000"),
    (["--config", "/nonexistent.json"], "config file '/nonexistent.json' does not exist"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, tmp_path):
    env = {**os.environ, "E3_CACHE": str(tmp_path)}
    out = subprocess.run(NODE + args + ["--no-replan"] + ([] if "--port" in args else ["--port", "0"]),
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_serves_the_default_model_and_stops_cleanly_on_sigterm(default_dir):
    env = {**os.environ, "E3_CACHE": str(Path(default_dir).parents[1])}
    proc = subprocess.Popen(NODE + ["--port", "0", "--workers", "2", "--no-replan"], stdout=subprocess.PIPE,
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
        assert "example query over HTTP" in text and "predicted" in text
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
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopped" in rest
