"""The OpenAI-compatible endpoint over a real socket, on a tiny random Gemma 3 and a byte
tokenizer (test fakes for exactness; the real model is in tests/e2e/test_gemma3_270m.py)."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from e3.models.causal_lm.model import EarlyExitCausalLM
from e3.runtime.config import LLMConfig
from e3.runtime.llm_client import EngineClient
from e3.runtime.llm_engine import GenerationEngine
from e3.runtime.llm_service import LLMService
from e3.runtime.openai_http import make_app
from tests.models.llm_support import ByteTokenizer, library_greedy, tiny_gemma3

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def lm():
    return tiny_gemma3(vocab=ByteTokenizer.vocab)


def every_other(e, h):
    """Scripted rule (a test fake): rows whose first hidden value is positive leave at exit 0."""
    return h[:, 0] > 0


async def serve(lm, slots=2, max_len=48, use_exits=True, **config):
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=every_other),
                              LLMConfig(slots, max_len, use_exits, **config))
    served = LLMService(EngineClient(engine), TOK, "tiny", (2,))
    return TestClient(TestServer(make_app(served), host="127.0.0.1")), served


async def test_models_lists_the_one_model(lm):
    client, _ = await serve(lm)
    async with client:
        resp = await client.get("/v1/models")
        assert resp.status == 200
        assert [m["id"] for m in (await resp.json())["data"]] == ["tiny"]


async def test_greedy_completion_is_the_library_greedy_text(lm):
    client, _ = await serve(lm, use_exits=False)
    async with client:
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi there", "max_tokens": 12})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    want = library_greedy(lm, TOK("Hi there")["input_ids"], 12)
    choice = body["choices"][0]
    assert choice["tokens"][:len(want)] == want
    assert choice["text"] == TOK.decode(choice["tokens"])
    assert choice["exit_layers"] == [4] * len(choice["tokens"])
    assert body["usage"]["prompt_tokens"] == 9 and body["object"] == "text_completion"


async def test_stream_sends_every_token_then_done(lm):
    client, _ = await serve(lm)
    async with client:
        payload = {"prompt": "Once", "max_tokens": 10}
        whole = await (await client.post("/v1/completions", json=payload)).json()
        resp = await client.post("/v1/completions", json={**payload, "stream": True})
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in (await resp.text()).split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert [c["token"] for c in chunks] == whole["choices"][0]["tokens"]
    assert [c["exit_layer"] for c in chunks] == whole["choices"][0]["exit_layers"]
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert set(whole["choices"][0]["exit_layers"][1:]) <= {2, 4}
    assert chunks[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in chunks[:-1])


async def test_stop_string_cuts_the_text(lm):
    client, _ = await serve(lm, use_exits=False)
    async with client:
        whole = await (await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 12})).json()
        text = whole["choices"][0]["text"]
        stop = text[3:5]
        assert len(stop) == 2, text
        cut = await (await client.post("/v1/completions",
                                       json={"prompt": "ab", "max_tokens": 12, "stop": [stop]})).json()
    assert cut["choices"][0]["text"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("payload,message", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be in [1, 48], got 0"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens must be an integer, got '5'"),
    ({"prompt": "x", "temperature": 3}, "temperature must be in [0.0, 2.0], got 3"),
    ({"prompt": "x", "top_p": 0}, "top_p must be in (0.0, 1.0], got 0"),
    ({"prompt": "x", "stream": "yes"}, "stream must be true or false"),
    ({"prompt": "x", "n": 2}, "n must be 1"),
    ({"prompt": "x", "colour": "red"}, "unknown field 'colour'"),
    ({"max_tokens": 3}, "prompt must be a string"),
    ({"prompt": "x" * 40, "max_tokens": 10}, "exceeds the context limit of 48 tokens"),
    ({"prompt": "x", "stop": [1]}, "stop must be a non-empty string"),
    ([1, 2], "must be a JSON object"),
])
async def test_bad_requests_get_400_naming_the_field(lm, payload, message):
    client, served = await serve(lm)
    async with client:
        resp = await client.post("/v1/completions", json=payload)
        assert resp.status == 400
        assert message in (await resp.json())["error"]
        assert served.client.held == 0


async def test_invalid_json_and_unknown_model(lm):
    client, _ = await serve(lm)
    async with client:
        resp = await client.post("/v1/completions", data=b"{nope", headers={"Content-Type": "application/json"})
        assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]
        resp = await client.post("/v1/completions", json={"prompt": "x", "model": "gpt-9"})
        assert resp.status == 404 and "'gpt-9'" in (await resp.json())["error"]


async def test_full_kv_is_503_and_a_disconnect_frees_the_slot(lm):
    client, served = await serve(lm, slots=1, max_len=200)
    async with client:
        resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 150, "stream": True})
        await resp.content.readuntil(b"\n\n")                     # the first token has come
        busy = await client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
        assert busy.status == 503 and "KV slots" in (await busy.json())["error"]
        assert busy.headers["Retry-After"] == "1"
        resp.close()                                              # the client goes away
        for _ in range(300):
            if served.client.held == 0:
                break
            await asyncio.sleep(0.01)
        assert served.client.held == 0
        assert served.client.engine.aborts == 1                  # freed by the abort, not by its end
        assert served.client.engine.pool.free_slots == 1
        again = await client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
        assert again.status == 200


async def test_the_unchanged_openai_client_completes_and_streams(lm):
    openai = pytest.importorskip("openai")
    client, _ = await serve(lm, use_exits=False)
    async with client:
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        try:
            models = await api.models.list()
            assert [m.id for m in models.data] == ["tiny"]
            done = await api.completions.create(model="tiny", prompt="Hello", max_tokens=6)
            parts = [c async for c in await api.completions.create(model="tiny", prompt="Hello", max_tokens=6,
                                                                      stream=True)]
            with pytest.raises(openai.BadRequestError) as bad:
                await api.completions.create(model="tiny", prompt="Hello", max_tokens=-1)
            assert "max_tokens must be in" in str(bad.value.body)
        finally:
            await api.close()
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text
    assert done.choices[0].model_extra["exit_layers"] == [4] * 6
