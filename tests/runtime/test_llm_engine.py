"""The generation engine and its asyncio client on a tiny random Gemma 3 (exactness only)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from e3.models.causal_lm.model import EarlyExitCausalLM
from e3.runtime.errors import ConfigError
from e3.runtime.llm_client import EngineClient
from e3.runtime.config import LLMConfig
from e3.runtime.llm_engine import (EngineFullError, FinishedEvent, GenerationEngine,
                                   GenerationRequest, GenerationRequestError)
from tests.models.llm_support import first_positive, library_greedy, prompts, tiny_gemma3


@pytest.fixture(scope="module")
def lm():
    return tiny_gemma3()


def always(e, h):
    """Scripted rule (a test fake): every row leaves at the first exit."""
    return torch.ones(len(h), dtype=torch.bool)


def run_all(engine: GenerationEngine, arrivals: dict[int, list[GenerationRequest]]):
    """Step the engine until idle, adding arrivals[k] before step k; tokens per request."""
    out: dict[int, list] = {}
    k = 0
    while engine.busy or any(j >= k for j in arrivals):
        for req in arrivals.get(k, []):
            engine.add(req)
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev)
        k += 1
    return out


def test_continuous_batching_matches_greedy_per_request(lm):
    """Requests join at different steps and share decode batches; each one's tokens are the
    library's greedy tokens for its prompt alone, so no row saw another's KV."""
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=always),
                              LLMConfig(kv_slots=4, max_len=64, use_exits=False))
    ps = prompts(5)
    reqs = [GenerationRequest(p, max_tokens=6 + 2 * i) for i, p in enumerate(ps)]
    out = run_all(engine, {0: reqs[:2], 1: reqs[2:3], 3: reqs[3:4], 9: reqs[4:]})
    for req in reqs:
        evs = out[req.id]
        assert [e.index for e in evs] == list(range(req.max_tokens))
        assert evs[-1].finish == "length" and all(e.finish is None for e in evs[:-1])
        want = library_greedy(lm, req.prompt, req.max_tokens)
        assert [e.token for e in evs][:len(want)] == want
    assert engine.pool.free_slots == 4


def test_exits_report_layers_and_count(lm):
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=always), LLMConfig(kv_slots=2, max_len=32))
    reqs = [GenerationRequest(p, max_tokens=5) for p in prompts(2)]
    out = run_all(engine, {0: reqs})
    for req in reqs:
        layers = [e.exit_layer for e in out[req.id]]
        assert layers == [4, 2, 2, 2, 2]       # the first token comes from the full-depth prefill
    assert engine.exit_counts == {2: 8}


def test_stop_token_ends_the_sequence(lm):
    engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=1, max_len=32))
    first = library_greedy(lm, prompts(1)[0], 3)
    out = run_all(engine, {0: [GenerationRequest(prompts(1)[0], max_tokens=8, stop_tokens=(first[1],))]})
    (evs,) = out.values()
    assert [e.token for e in evs] == first[:2] and evs[-1].finish == "stop"


def test_full_pool_refuses_and_admits_again_after_a_finish(lm):
    engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=2, max_len=32))
    a, b, c = (GenerationRequest(p, max_tokens=2) for p in prompts(3))
    engine.add(a)
    engine.add(b)
    with pytest.raises(EngineFullError, match="all 2 KV slots"):
        engine.add(c)
    while engine.busy:
        engine.step()
    engine.add(c)


@pytest.mark.parametrize("field,value,message", [
    ("prompt", list(range(3, 30)), "exceeds the context limit of 32 tokens"),
    ("prompt", [], "at least one token"),
    ("max_tokens", 0, "max_tokens must be a positive integer, got 0"),
    ("temperature", -1.0, "temperature must be in"),
    ("top_p", 0.0, "top_p must be in"),
])
def test_bad_requests_name_the_problem(lm, field, value, message):
    engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=1, max_len=32))
    req = GenerationRequest([5, 6, 7], max_tokens=8)
    setattr(req, field, value)
    with pytest.raises(GenerationRequestError, match=message):
        engine.add(req)
    assert engine.pool.free_slots == 1


def test_bad_config_quotes_the_value():
    with pytest.raises(ConfigError, match="llm.kv_slots must be at least 1, got 0"):
        LLMConfig(kv_slots=0).validate()


class Clock:
    """The engine's clock, set by the test (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_token_past_its_deadline_ends_the_sequence_and_frees_its_slot(lm):
    clock = Clock()
    engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=2, max_len=32, token_deadline_ms=500),
                              clock=clock)
    late, punctual = (GenerationRequest(p, max_tokens=10) for p in prompts(2))
    engine.add(late)
    assert [e.index for e in engine.step()] == [0, 1]       # its prefill's token and one decode step, at 0
    clock.now = 0.6                                         # its next token comes 600 ms after the last
    engine.add(punctual)                                    # admitted now: its tokens are on time
    evs = engine.step()
    assert FinishedEvent(late.id, "deadline") in evs
    assert [(e.request_id, e.index) for e in evs if not isinstance(e, FinishedEvent)] == [(punctual.id, 0),
                                                                                          (punctual.id, 1)]
    assert engine.pool.free_slots == 1 and engine.deadline_misses == 1
    assert [e.index for e in engine.step()] == [2]          # the late one is gone for good


def test_a_first_token_counts_from_admission(lm):
    clock = Clock()
    engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=1, max_len=32, token_deadline_ms=500),
                              clock=clock)
    req = GenerationRequest(prompts(1)[0], max_tokens=4)
    engine.add(req)
    clock.now = 0.7
    assert engine.step() == [FinishedEvent(req.id, "deadline")]
    assert engine.pool.free_slots == 1 and not engine.busy


def test_tokens_within_the_deadline_run_to_their_end(lm):
    clock = Clock()
    engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=1, max_len=32, token_deadline_ms=500),
                              clock=clock)
    req = GenerationRequest(prompts(1)[0], max_tokens=6)
    engine.add(req)
    out = []
    while engine.busy:
        clock.now += 0.49                      # every step just inside the deadline
        out += engine.step()
    assert [e.index for e in out] == list(range(6)) and out[-1].finish == "length"
    assert engine.deadline_misses == 0


def test_no_deadline_when_it_is_off(lm):
    clock = Clock()
    engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=1, max_len=32, token_deadline_ms=None),
                              clock=clock)
    req = GenerationRequest(prompts(1)[0], max_tokens=3)
    engine.add(req)
    clock.now = 1e6
    assert [e.index for e in run_all(engine, {})[req.id]] == [0, 1, 2]


def test_abort_frees_the_slot(lm):
    engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=1, max_len=32))
    req = GenerationRequest(prompts(1)[0], max_tokens=20)
    engine.add(req)
    engine.step()
    engine.abort(req.id)
    assert engine.step() == [FinishedEvent(req.id)]
    assert engine.pool.free_slots == 1 and not engine.busy


def test_seeded_sampling_repeats(lm):
    def sample(seed):
        engine = GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(kv_slots=1, max_len=32))
        req = GenerationRequest(prompts(1)[0], max_tokens=10, temperature=1.0, top_p=0.9, seed=seed)
        return [e.token for e in run_all(engine, {0: [req]})[req.id]]
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


async def test_client_streams_in_order_and_a_closed_stream_frees_its_slot(lm):
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=always), LLMConfig(kv_slots=2, max_len=64))
    client = EngineClient(engine)
    await client.start()
    try:
        long_req = GenerationRequest(prompts(1)[0], max_tokens=50)
        short_req = GenerationRequest(prompts(2)[1], max_tokens=5)
        long_stream = client.generate(long_req)
        client.generate(short_req)                   # never read: it runs to its end on its own
        with pytest.raises(EngineFullError):
            client.generate(GenerationRequest([3], max_tokens=1))
        got = []
        async for ev in long_stream:
            got.append(ev.index)
            if len(got) == 3:
                break
        await long_stream.aclose()
        assert got == [0, 1, 2]
        for _ in range(200):
            if client.held <= 1:
                break
            await asyncio.sleep(0.01)
        assert client.held <= 1                      # the aborted one is freed; the short may still run
        again = client.generate(GenerationRequest(prompts(3)[2], max_tokens=4))
        assert [e.index async for e in again] == [0, 1, 2, 3]
    finally:
        await client.close()
    assert engine.pool.free_slots == 2



ARRIVALS = {0: [0, 1], 1: [2], 3: [3], 5: [4, 5]}        # step -> requests joining then


def arriving(reqs):
    return {k: [reqs[i] for i in v if i < len(reqs)] for k, v in ARRIVALS.items()}


def requests(n=6):
    return [GenerationRequest(p, max_tokens=8 + i) for i, p in enumerate(prompts(n))]


def tokens_of(out, reqs):
    return [[(e.token, e.exit_layer) for e in out[r.id]] for r in reqs]


def test_rebatched_decoding_with_exits_off_is_the_library_greedy(lm):
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=always),
                              LLMConfig(kv_slots=6, max_len=64, use_exits=False, split_layers=[1, 3]))
    reqs = requests()
    out = run_all(engine, arriving(reqs))
    for req in reqs:
        evs = out[req.id]
        assert [e.index for e in evs] == list(range(req.max_tokens)) and evs[-1].finish == "length"
        want = library_greedy(lm, req.prompt, req.max_tokens)
        assert [e.token for e in evs][:len(want)] == want
    assert engine.pool.free_slots == 6 and not engine.busy


@pytest.mark.parametrize("mode", ["copy", "exact"])
def test_rebatching_merges_survivors_of_several_steps_and_changes_no_token(lm, mode):
    """Each sequence's tokens and exit layers are those of the engine without rebatching (so its
    tokens stayed in order and no row saw another's KV), while deeper splits ran tokens that
    started at different steps together, in fewer, fuller batches."""
    def engine(**split):
        return GenerationEngine(EarlyExitCausalLM(lm, (2,), kv_mode=mode, rule=first_positive),
                                LLMConfig(kv_slots=6, max_len=64, **split))
    plain, rebatched = engine(), engine(split_layers=[2], merge_rows=3)
    a, b = requests(), requests()
    want = tokens_of(run_all(plain, arriving(a)), a)
    got = tokens_of(run_all(rebatched, arriving(b)), b)
    assert got == want
    assert {layer for row in got for _, layer in row[1:]} == {2, 4}       # both exits were taken
    assert rebatched.merged_batches > 0
    deep = [rows for (k, rows), n in rebatched.split_batches.items() for _ in range(n) if k == 1]
    assert sum(deep) == sum(layer == 4 for row in got for _, layer in row[1:])
    assert rebatched.pool.free_slots == 6


def test_a_rebatched_step_pays_the_lm_head_once_for_every_split(lm):
    """Tokens finished in different splits of one engine step share one head call (the head of
    Gemma 3 costs more than its layers), and still get the same tokens as without splits."""
    def engine(**split):
        return GenerationEngine(EarlyExitCausalLM(lm, (1, 2), rule=first_positive),
                                LLMConfig(kv_slots=6, max_len=64, token_deadline_ms=None, **split))
    plain, rebatched = engine(), engine(split_layers=[1, 2], merge_rows=1)
    calls = []
    family = rebatched.model.family
    real = family.logits
    family.logits = lambda h: calls.append(len(h)) or real(h)
    a, b = requests(), requests()
    want = tokens_of(run_all(plain, arriving(a)), a)
    steps = []
    k, arrivals, got = 0, arriving(b), {}
    while rebatched.busy or any(j >= k for j in arrivals):
        for req in arrivals.get(k, []):
            rebatched.add(req)
        before, evs = len(calls), rebatched.step()
        prefills = len(arrivals.get(k, []))                    # each prefill pays its own head
        steps.append((len(calls) - before - prefills, {e.exit_layer for e in evs if e.index > 0}))
        for ev in evs:
            got.setdefault(ev.request_id, []).append(ev)
        k += 1
    assert tokens_of(got, b) == want
    assert all(heads == (1 if layers else 0) for heads, layers in steps)
    assert any(len(layers) >= 2 for _, layers in steps)    # steps whose tokens finished in several splits


def scripted(*calls):
    """Scripted rule (a test fake): the exit decisions of its first calls, then every row leaves."""
    queue = [torch.tensor(c) for c in calls]
    return lambda e, h: queue.pop(0) if queue else torch.ones(len(h), dtype=torch.bool)


def test_a_sequence_aborted_while_its_token_waits_is_freed(lm):
    rule = scripted([True], [False, True])     # step 1: stuck's token leaves; step 2: it stays, runner's leaves
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=rule),
                              LLMConfig(kv_slots=2, max_len=64, split_layers=[2], merge_rows=2, max_wait_steps=50))
    stuck, runner = (GenerationRequest(p, max_tokens=20) for p in prompts(2))
    engine.add(stuck)
    engine.step()
    engine.add(runner)
    engine.step()
    assert stuck.id in engine._in_flight and [w.seq.req.id for w in engine._waiting[1]] == [stuck.id]
    engine.abort(stuck.id)
    evs = engine.step()
    assert FinishedEvent(stuck.id) in evs and stuck.id not in engine._in_flight
    assert not engine._waiting[1] and engine.pool.free_slots == 1
    while engine.busy:
        evs += engine.step()
    assert [e.index for e in evs if e.request_id == runner.id][-1] == 19 and engine.pool.free_slots == 2


def test_a_waiting_token_runs_alone_after_max_wait_steps(lm):
    rule = scripted([True], [False, True])
    engine = GenerationEngine(EarlyExitCausalLM(lm, (2,), rule=rule),
                              LLMConfig(kv_slots=2, max_len=64, split_layers=[2], merge_rows=2, max_wait_steps=2))
    stuck, runner = (GenerationRequest(p, max_tokens=20) for p in prompts(2))
    engine.add(stuck)
    engine.step()
    engine.add(runner)
    engine.step()                                  # stuck's third token waits at layer 2
    third = engine.step()                          # runner goes on; stuck's token has waited 1 step
    fourth = engine.step()                         # 2 steps: it runs split 1 alone
    assert [e.request_id for e in third] == [runner.id]
    assert [(e.index, e.exit_layer) for e in fourth if e.request_id == stuck.id] == [(2, 4)]
    assert engine.split_batches[(1, 1)] == 1


def test_split_layers_beyond_the_model_are_refused(lm):
    with pytest.raises(ConfigError, match="llm.split_layers must be layer counts in 1..3 for this 4-layer model"):
        GenerationEngine(EarlyExitCausalLM(lm), LLMConfig(split_layers=[2, 4]))
