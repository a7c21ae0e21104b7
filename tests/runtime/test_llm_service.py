"""The served LM as text (the sidecar's `generate`, drain, chat format) on a tiny random Gemma 3
and a byte tokenizer (test fakes for exactness; the real model is in tests/e2e/test_llm_node.py)."""
from __future__ import annotations

import asyncio

import pytest

from e3.models.causal_lm.model import EarlyExitCausalLM
from e3.runtime.config import LLMConfig
from e3.runtime.errors import NotReadyError
from e3.runtime.llm_client import EngineClient
from e3.runtime.llm_engine import EngineFullError, GenerationEngine, GenerationRequestError
from e3.runtime.llm_service import GEMMA_TURNS, LLMService, gemma_turns
from e3.runtime.openai_protocol import ProtocolError
from tests.models.llm_support import ByteTokenizer, first_positive, library_greedy

TOK = ByteTokenizer()



def service(lm, slots=2, max_len=64, use_exits=True, **config) -> LLMService:
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=first_positive),
                              LLMConfig(slots, max_len, use_exits, **config))
    return LLMService(EngineClient(engine), TOK, "tiny", (2,))


async def until(cond, tries=300):
    for _ in range(tries):
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


async def test_generate_yields_text_pieces_with_exit_layers(lm):
    async with service(lm, use_exits=False) as llm:
        pieces = [p async for p in llm.generate("Hi there", max_tokens=10)]
    want = library_greedy(lm, TOK("Hi there")["input_ids"], 10)
    assert [p.token for p in pieces][:len(want)] == want
    assert "".join(p.text for p in pieces) == TOK.decode([p.token for p in pieces])
    assert [p.exit_layer for p in pieces] == [4] * len(pieces)
    assert pieces[-1].finish in ("length", "stop") and all(p.finish is None for p in pieces[:-1])


async def test_exits_show_in_the_pieces(lm):
    async with service(lm) as llm:
        gen = llm.generate("Once upon", max_tokens=12)
        pieces = [p async for p in gen]
    assert {p.exit_layer for p in pieces[1:]} <= {2, 4} and 2 in {p.exit_layer for p in pieces}
    assert gen.exit_layers == [p.exit_layer for p in pieces] and gen.finish == pieces[-1].finish


async def test_a_stop_string_ends_the_text_and_frees_the_slot(lm):
    async with service(lm, use_exits=False) as llm:
        text = "".join([p.text async for p in llm.generate("ab", max_tokens=12)])
        stop = text[3:5]
        assert len(stop) == 2, text
        gen = llm.generate("ab", max_tokens=12, stop=[stop])
        cut = "".join([p.text async for p in gen])
        assert cut == text[:text.find(stop)] and gen.finish == "stop"
        assert await until(lambda: llm.client.held == 0)


async def test_leaving_early_aborts_and_frees_the_slot(lm):
    async with service(lm, slots=1, max_len=200) as llm:
        async with llm.generate("a", max_tokens=150) as gen:
            async for piece in gen:
                break
        assert await until(lambda: llm.client.held == 0)
        assert llm.client.engine.aborts == 1 and llm.client.engine.pool.free_slots == 1


async def test_refusals_are_immediate(lm):
    async with service(lm, slots=1, max_len=200) as llm:
        with pytest.raises(GenerationRequestError, match="exceeds the context limit of 200"):
            llm.generate("x" * 150, max_tokens=60)
        with pytest.raises(ProtocolError, match="stop must hold non-empty strings"):
            llm.generate("x", stop=[""])
        async with llm.generate("a", max_tokens=150):
            with pytest.raises(EngineFullError, match="all 1 KV slots"):
                llm.generate("b", max_tokens=2)


async def test_drain_refuses_new_requests_and_lets_running_ones_finish(lm):
    llm = service(lm, slots=2, max_len=64)
    await llm.start()
    try:
        gen = llm.generate("a", max_tokens=30)
        draining = asyncio.ensure_future(llm.drain(timeout_s=60))
        await asyncio.sleep(0)
        assert not llm.ready
        with pytest.raises(NotReadyError, match="draining"):
            llm.generate("b", max_tokens=2)
        pieces = [p async for p in gen]
        assert await draining is True
        assert len(pieces) == 30 or pieces[-1].finish == "stop"
    finally:
        await llm.close()


async def test_a_missed_deadline_ends_with_a_closing_piece(lm):
    clock_at = [0.0]
    llm = service(lm, slots=1, max_len=200, token_deadline_ms=500)
    llm.client.engine.clock = lambda: clock_at[0]
    async with llm:
        gen = llm.generate("a", max_tokens=150)
        first = await gen.__anext__()
        clock_at[0] = 100.0                  # every later token is late
        rest = [p async for p in gen]
    assert first.token is not None and rest[-1].token is None and rest[-1].finish == "deadline"
    assert gen.finish == "deadline" and len(gen.tokens) < 150
    assert llm.client.engine.pool.free_slots == 1 and llm.client.engine.deadline_misses == 1
    assert b'e3_llm_requests_total{outcome="deadline"} 1.0' in llm.metrics.render()


def test_gemma_turns_is_gemmas_documented_format():
    text = gemma_turns([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}])
    assert text == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ProtocolError, match="at least one user or assistant message"):
        gemma_turns([{"role": "system", "content": "x"}])


def test_a_tokenizer_without_a_template_uses_gemma_turns(lm):
    llm = service(lm)
    assert llm.chat_format == GEMMA_TURNS
    assert llm.chat_ids([{"role": "user", "content": "Hi"}]) == TOK(
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")["input_ids"]
