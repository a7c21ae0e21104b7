"""The OpenAI-compatible endpoint over a real socket, on a tiny random Gemma 3 and a byte
tokenizer (test fakes for exactness; the real model and node: tests/e2e/test_llm_node.py)."""
from __future__ import annotations

import asyncio
import io
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from e3.models.causal_lm.model import EarlyExitCausalLM
from e3.runtime.config import LLMConfig
from e3.runtime.llm_client import EngineClient
from e3.runtime.llm_engine import GenerationEngine
from e3.runtime.llm_service import LLMService
from e3.runtime.openai_http import make_app
from tests.models.llm_support import ByteTokenizer, first_positive, library_greedy

TOK = ByteTokenizer()


async def serve(lm, slots=2, max_len=48, use_exits=True, **config):
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=first_positive),
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


def sse(text: str) -> list:
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_chat_answers_in_the_chat_shape_from_gemma_turns(lm):
    client, served = await serve(lm, use_exits=False, max_len=128)   # the turn markers are 58 bytes
    messages = [{"role": "user", "content": "Hi"}]
    async with client:
        resp = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                               "max_tokens": 8})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    prompt = TOK("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")["input_ids"]
    want = library_greedy(lm, prompt, 8)
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["tokens"][:len(want)] == want and choice["message"]["content"] == TOK.decode(choice["tokens"])
    assert body["usage"]["prompt_tokens"] == len(prompt)


async def test_chat_streams_deltas_role_first_then_usage(lm):
    client, _ = await serve(lm, max_len=128)
    payload = {"messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 9}
    async with client:
        whole = await (await client.post("/v1/chat/completions", json=payload)).json()
        resp = await client.post("/v1/chat/completions", json={**payload, "stream": True,
                                                               "stream_options": {"include_usage": True}})
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        chunks = sse(await resp.text())
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c["choices"][0] for c in chunks[1:-1]]
    assert [t["token"] for t in tokens] == whole["choices"][0]["tokens"]
    assert [t["exit_layer"] for t in tokens] == whole["choices"][0]["exit_layers"]
    assert "".join(t["delta"].get("content", "") for t in tokens) == whole["choices"][0]["message"]["content"]
    assert tokens[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("payload,message", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "unsupported field(s) ['tool_calls']"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "unknown field 'tools'"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99}, "must be in [1, 48], got 99"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options is only allowed with stream: true"),
    ({"messages": [{"role": "user", "content": "x" * 40}]}, "exceeds the context limit of 48 tokens"),
    ({"messages": [{"role": "system", "content": "x"}]}, "at least one user or assistant message"),
])
async def test_bad_chat_requests_get_400_naming_the_problem(lm, payload, message):
    client, served = await serve(lm)
    async with client:
        resp = await client.post("/v1/chat/completions", json=payload)
        assert resp.status == 400
        assert message in (await resp.json())["error"]
    assert served.client.held == 0


async def test_a_missed_token_deadline_ends_the_stream_with_finish_deadline(lm):
    client, served = await serve(lm, slots=1, max_len=200, token_deadline_ms=500)
    clock_at = [0.0]
    served.client.engine.clock = lambda: clock_at[0]
    async with client:
        resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 150, "stream": True})
        await resp.content.readuntil(b"\n\n")              # the first token has come ...
        clock_at[0] = 100.0                                 # ... and every later one is late
        chunks = [json.loads(line[6:]) for line in (await resp.text()).split("\n\n") if line.startswith("data: {")]
        last = chunks[-1]["choices"][0]
        assert last["finish_reason"] == "deadline" and last["token"] is None
        assert len(chunks) < 150 and served.client.held == 0
        assert served.client.engine.pool.free_slots == 1
        # the freed slot serves again; the clock stands still now, so every token is on time
        whole = await (await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5})).json()
        assert whole["choices"][0]["finish_reason"] == "length" and len(whole["choices"][0]["tokens"]) == 5


async def test_the_unchanged_openai_client_chats_and_streams(lm):
    openai = pytest.importorskip("openai")
    client, _ = await serve(lm, use_exits=False, max_len=128)
    messages = [{"role": "user", "content": "Hello"}]
    async with client:
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        try:
            done = await api.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
            parts = [c async for c in await api.chat.completions.create(model="tiny", messages=messages,
                                                                           max_tokens=6, stream=True)]
            with pytest.raises(openai.BadRequestError) as bad:
                await api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 60}])
            assert "context limit" in str(bad.value.body)
        finally:
            await api.close()
    assert done.choices[0].message.role == "assistant" and done.usage.completion_tokens == len(
        done.choices[0].model_extra["tokens"])
    assert "".join(p.choices[0].delta.content or "" for p in parts) == done.choices[0].message.content
    assert [p.choices[0].model_extra.get("exit_layer") for p in parts[1:]] == done.choices[0].model_extra["exit_layers"]


async def test_a_long_prompt_is_tokenized_off_the_loop_and_a_huge_body_is_413(lm):
    client, served = await serve(lm)
    async with client:
        def body(payload):
            return {"data": io.BytesIO(json.dumps(payload).encode()), "headers": {"Content-Type": "application/json"}}
        resp = await client.post("/v1/completions", **body({"prompt": "x" * 20_000, "max_tokens": 2}))
        assert resp.status == 400 and "prompt (20001 tokens)" in (await resp.json())["error"]
        resp = await client.post("/v1/completions", **body({"prompt": "x" * (2 << 20)}))
        assert resp.status == 413 and "request body too large (limit 1048576 bytes)" in (await resp.json())["error"]
    assert served.client.held == 0
