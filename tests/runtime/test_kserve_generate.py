"""The KServe / Triton generate extension over a real socket, on a tiny random Gemma 3 and a byte
tokenizer (test fakes for exactness)."""
from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from e3.models.causal_lm.model import EarlyExitCausalLM
from e3.runtime.config import LLMConfig
from e3.runtime.kserve_generate import add_routes
from e3.runtime.llm_client import EngineClient
from e3.runtime.llm_engine import GenerationEngine
from e3.runtime.llm_service import LLMService
from e3.runtime.openai_http import BODY_LIMIT_KEY, SERVICE_KEY, errors_as_json
from tests.models.llm_support import ByteTokenizer, first_positive, library_greedy

TOK = ByteTokenizer()



def serve(lm, use_exits=True) -> tuple[TestClient, LLMService]:
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=first_positive), LLMConfig(2, 48, use_exits))
    service = LLMService(EngineClient(engine), TOK, "tiny", (2,))
    app = web.Application(middlewares=[errors_as_json])
    app[SERVICE_KEY], app[BODY_LIMIT_KEY] = service, 1024 ** 2
    add_routes(app)

    async def lifecycle(app):
        await service.start()
        yield
        await service.close()
    app.cleanup_ctx.append(lifecycle)
    return TestClient(TestServer(app, host="127.0.0.1")), service


async def test_generate_answers_text_output_with_exit_layers(lm):
    client, _ = serve(lm, use_exits=False)
    async with client:
        resp = await client.post("/v2/models/tiny/generate",
                                 json={"text_input": "Hi there", "parameters": {"max_tokens": 10, "temperature": 0}})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        versioned = await (await client.post("/v2/models/tiny/versions/1/generate",
                                             json={"text_input": "Hi there", "parameters": {"max_tokens": 10}})).json()
    want = library_greedy(lm, TOK("Hi there")["input_ids"], 10)
    assert body["model_name"] == "tiny" and body["model_version"] == "1"
    assert body["tokens"][:len(want)] == want and body["text_output"] == TOK.decode(body["tokens"])
    assert body["exit_layers"] == [4] * len(body["tokens"]) and body["finish_reason"] in ("length", "stop")
    assert versioned == body


async def test_generate_stream_sends_one_event_per_token(lm):
    client, _ = serve(lm)
    payload = {"text_input": "Once", "parameters": {"max_tokens": 10}}
    async with client:
        whole = await (await client.post("/v2/models/tiny/generate", json=payload)).json()
        resp = await client.post("/v2/models/tiny/generate_stream", json=payload)
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        events = [json.loads(e[6:]) for e in (await resp.text()).split("\n\n") if e.startswith("data: ")]
    assert [e["token"] for e in events] == whole["tokens"]
    assert [e["exit_layer"] for e in events] == whole["exit_layers"]
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert events[-1]["finish_reason"] == whole["finish_reason"] and all(e["finish_reason"] is None
                                                                         for e in events[:-1])


@pytest.mark.parametrize("path,payload,status,message", [
    ("generate", {"parameters": {}}, 400, "text_input must be a non-empty string"),
    ("generate", {"text_input": "x", "inputs": []}, 400, "unknown field(s) ['inputs']"),
    ("generate", {"text_input": "x", "parameters": {"beam_width": 2}}, 400, "unknown parameter(s) ['beam_width']"),
    ("generate", {"text_input": "x", "parameters": {"stream": True}}, 400, "use generate_stream"),
    ("generate_stream", {"text_input": "x", "parameters": {"stream": False}}, 400, "use generate"),
    ("generate", {"text_input": "x", "parameters": {"max_tokens": 0}}, 400, "max_tokens must be in [1, 48], got 0"),
    ("generate", {"text_input": "x" * 40, "parameters": {"max_tokens": 10}}, 400, "exceeds the context limit"),
    ("generate", {"text_input": "x", "parameters": {"stop": 3}}, 400, "stop must be a non-empty string"),
    ("generate", [1], 400, "must be a JSON object"),
])
async def test_bad_generate_requests_get_400_naming_the_problem(lm, path, payload, status, message):
    client, service = serve(lm)
    async with client:
        resp = await client.post(f"/v2/models/tiny/{path}", json=payload)
        assert resp.status == status
        assert message in (await resp.json())["error"]
    assert service.client.held == 0


async def test_unknown_model_or_version_is_404(lm):
    client, _ = serve(lm)
    async with client:
        resp = await client.post("/v2/models/gpt/generate", json={"text_input": "x"})
        assert resp.status == 404 and "'gpt'" in (await resp.json())["error"]
        resp = await client.post("/v2/models/tiny/versions/2/generate", json={"text_input": "x"})
        assert resp.status == 404 and "only '1' exists" in (await resp.json())["error"]
