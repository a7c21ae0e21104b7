"""The causal-LM node's app and lifecycle (start, demo over HTTP, drain on stop) on a tiny random
Gemma 3 and a byte tokenizer (test fakes; the real model and process: tests/e2e/test_llm_node.py)."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from e3.models.causal_lm.model import EarlyExitCausalLM
from e3.runtime.config import E3Config, LLMConfig
from e3.runtime.llm_client import EngineClient
from e3.runtime.llm_engine import GenerationEngine
from e3.runtime.llm_node import LLMNode
from e3.runtime.llm_service import LLMService
from tests.models.llm_support import ByteTokenizer, first_positive

TOK = ByteTokenizer()



def node(lm, **llm) -> LLMNode:
    config = E3Config()
    config.server.port = 0
    config.server.grpc_port = 0
    config.llm = LLMConfig(kv_slots=2, max_len=96, **llm)

    def loader():
        engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=first_positive), config.llm)
        return LLMService(EngineClient(engine), TOK, "tiny", (2,))
    return LLMNode(config.validate(), loader)


async def test_start_prints_the_demo_with_exit_layers_and_a_curl_that_streams(lm, capsys):
    n = node(lm)
    try:
        await n.start(demo=True)
        out = capsys.readouterr().out
        assert f"serving causal LM 'tiny' on {n.url}" in out and "exits after layers 2 of 4, copy KV" in out
        assert "demo, streamed over HTTP (20 tokens" in out and "'The capital of France is' ->" in out
        layers = [int(w) for line in out.split("full depth):\n")[1].split("e3-node:")[0].splitlines()
                  for w in line.split() if w.isdigit()]
        assert len(layers) == 20 and set(layers) <= {2, 4}
        curl = next(line.strip() for line in out.splitlines() if line.strip().startswith("curl -sN"))
        body = json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0])
        assert curl.split()[2] == f"{n.url}/v1/completions" and body["stream"] is True
        async with aiohttp.ClientSession() as s:
            async with s.post(curl.split()[2], json=body) as resp:
                assert resp.status == 200 and (await resp.text()).endswith("data: [DONE]\n\n")
    finally:
        await n.shutdown()


async def test_health_metadata_and_metrics(lm):
    n = node(lm, split_layers=[2])
    try:
        await n.start(demo=False)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{n.url}/v2/health/ready") as resp:
                assert resp.status == 200 and await resp.json() == {"ready": True}
            async with s.get(f"{n.url}/v2/health/live") as resp:
                assert await resp.json() == {"live": True}
            async with s.get(f"{n.url}/v2") as resp:
                assert "generate" in (await resp.json())["extensions"]
            async with s.get(f"{n.url}/v2/models/tiny") as resp:
                meta = await resp.json()
                assert meta["parameters"]["e3"]["exits"] == [2] and meta["inputs"][0]["name"] == "text_input"
                assert meta["parameters"]["e3"]["split_layers"] == [2]
            async with s.get(f"{n.url}/v2/models/other/ready") as resp:
                assert resp.status == 404 and "'other'" in (await resp.json())["error"]
            async with s.post(f"{n.url}/v2/models/tiny/generate", json={"text_input": "hi",
                                                                          "parameters": {"max_tokens": 3}}) as resp:
                assert resp.status == 200
            async with s.post(f"{n.url}/v1/completions", json={"prompt": ""}) as resp:
                assert resp.status == 400
            async with s.get(f"{n.url}/metrics") as resp:
                text = await resp.text()
        assert "e3_llm_tokens_total{exit_layer=" in text and 'e3_llm_requests_total{outcome="admitted"} 1.0' in text
        assert 'e3_bad_requests_total{status="400"} 1.0' in text and "e3_llm_kv_slots 2.0" in text
    finally:
        await n.shutdown()


async def test_shutdown_lets_a_running_stream_finish(lm):
    n = node(lm)
    await n.start(demo=False)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{n.url}/v1/completions", json={"prompt": "a", "max_tokens": 40, "stream": True})
        await resp.content.readuntil(b"\n\n")                  # it is running
        stopping = asyncio.ensure_future(n.shutdown())
        text = await resp.text()
        await stopping
    chunks = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert text.endswith("data: [DONE]\n\n") and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert not n.service.ready and n.service.client.held == 0
