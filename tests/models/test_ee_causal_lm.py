"""The early-exit causal LM on tiny random models: exactness of its KV handling.

Random weights are fine here: these tests check that tokens and K/V equal what
the library computes, not how good the text is. Exit decisions come from
scripted rules (labelled below), so that exits happen at known places.
"""
from __future__ import annotations

import pytest
import torch

from e3.models.causal_lm.model import EarlyExitCausalLM, SequenceKV

from .llm_support import library_greedy, prompts, tiny_gemma3, tiny_llama


def greedy(model: EarlyExitCausalLM, batch: list[list[int]], n: int, use_exits=True):
    """Greedy generation of n tokens for every prompt, all rows decoded in one batch per step."""
    pool = model.new_pool(len(batch), max(map(len, batch)) + n)
    seqs = [SequenceKV(pool.acquire()) for _ in batch]
    nxt = [int(model.prefill(pool, s, p).argmax()) for s, p in zip(seqs, batch)]
    toks, layers = [[t] for t in nxt], [[model.num_layers] for _ in batch]
    for _ in range(n - 1):
        out = model.decode(pool, seqs, nxt, use_exits=use_exits)
        nxt = out.logits.argmax(-1).tolist()
        for r, t in enumerate(nxt):
            toks[r].append(t)
            layers[r].append(out.exit_layers[r])
    return toks, layers, pool, seqs


@pytest.mark.parametrize("make", [tiny_gemma3, tiny_llama], ids=["gemma3", "llama"])
def test_exits_disabled_equals_library_greedy(make):
    lm = make()
    batch = prompts(4)
    model = EarlyExitCausalLM(lm, exits=(1, 2), rule=lambda e, h: torch.ones(len(h), dtype=torch.bool))
    toks, layers, _, _ = greedy(model, batch, 16, use_exits=False)
    for p, t in zip(batch, toks):
        want = library_greedy(lm, p, 16)
        assert len(want) == 16 or want[-1] == lm.config.eos_token_id
        assert t[:len(want)] == want
    assert all(l == 4 for row in layers for l in row)


def every_other(e, h):
    """Scripted rule (a test fake, not an estimator): rows whose hidden sums > 0 leave at exit 0."""
    return h.sum(-1) > 0 if e == 0 else torch.zeros(len(h), dtype=torch.bool)


@pytest.mark.parametrize("mode", ["copy", "exact"])
def test_exit_modes_generate_and_report_exit_layers(mode):
    lm = tiny_gemma3()
    model = EarlyExitCausalLM(lm, exits=(2,), kv_mode=mode, rule=every_other)
    toks, layers, _, _ = greedy(model, prompts(4), 20)
    flat = [l for row in layers for l in row[1:]]
    assert set(flat) == {2, 4}, flat            # some tokens left at layer 2, some ran all 4
    assert all(0 <= t < lm.config.vocab_size for row in toks for t in row)
    assert all(len(row) == 20 for row in toks)


def coin(p: float, seed: int = 3):
    """Scripted rule (a test fake): each row leaves at each exit with probability p, seeded."""
    g = torch.Generator().manual_seed(seed)
    return lambda e, h: torch.rand(len(h), generator=g) < p


@pytest.mark.parametrize("make", [lambda: tiny_gemma3(window=64), tiny_llama], ids=["gemma3", "llama"])
def test_exact_mode_deep_kv_equals_full_recomputation(make):
    lm = make()
    model = EarlyExitCausalLM(lm, exits=(1, 3), kv_mode="exact", rule=coin(0.35))
    batch = prompts(3)
    toks, layers, pool, seqs = greedy(model, batch, 24)
    assert {l for row in layers for l in row} >= {1, 3, 4}
    layers_of = {tuple(p): row for p, row in zip(batch, layers)}
    for p, t, s in zip(batch, toks, seqs):
        ids = torch.tensor([p + t[:-1]])        # every input token the cache has seen
        full = lm(ids, use_cache=True).past_key_values
        pending = {q.position: q.layer for q in s.pending}
        # the input at position len(p) + k - 1 made token k; where did it stop?
        stopped = {len(p) + k - 1: l for k, l in enumerate(layers_of[tuple(p)]) if k > 0}
        last_deep = max(q for q, l in stopped.items() if l == 4)
        assert all(q > last_deep for q in pending), "a deep pass leaves nothing pending before it"
        assert any(l < 4 for q, l in stopped.items() if q < last_deep), "some parked token was caught up"
        for layer in range(4):
            want_k = full.layers[layer].keys[0]
            have_k = pool.k[layer, s.slot, :, : ids.shape[1]]
            done = [i for i in range(ids.shape[1]) if pending.get(i, 99) > layer]
            assert len(done) >= ids.shape[1] - len(pending)
            torch.testing.assert_close(have_k[:, done], want_k[:, done], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(pool.v[layer, s.slot, :, done], full.layers[layer].values[0][:, done],
                                       rtol=1e-4, atol=1e-5)


def test_copy_mode_kv_is_projected_from_the_exit_state():
    """Copy mode: a token that left after 2 layers has its layer 2-3 K/V projected from its exit
    state. Layer 2's input is that state, so its K/V equal the full model's; layer 3's differ
    (the approximation); layers 0-1 ran as usual."""
    lm = tiny_gemma3(window=64)
    model = EarlyExitCausalLM(lm, exits=(2,), kv_mode="copy", rule=lambda e, h: torch.ones(len(h), dtype=torch.bool))
    toks, _, pool, seqs = greedy(model, prompts(1), 6)
    p, t, s = prompts(1)[0], toks[0], seqs[0]
    ids = torch.tensor([p + t[:-1]])
    full = lm(ids, use_cache=True).past_key_values
    n = ids.shape[1]
    for layer in range(4):
        have = pool.k[layer, s.slot, :, len(p):n]
        want = full.layers[layer].keys[0][:, len(p):n]
        if layer <= 2:
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)
        else:
            assert not torch.allclose(have, want, atol=1e-3)


def test_bad_exits_and_mode_are_refused():
    lm = tiny_gemma3()
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        EarlyExitCausalLM(lm, exits=(0, 2))
    with pytest.raises(ValueError, match="'deep'"):
        EarlyExitCausalLM(lm, exits=(2,), kv_mode="deep")


def greedy_by_splits(model: EarlyExitCausalLM, batch, n: int, bounds: list[int]):
    """greedy(), but every decode step runs split by split (start, then advance to each bound)."""
    pool = model.new_pool(len(batch), max(map(len, batch)) + n)
    seqs = [SequenceKV(pool.acquire()) for _ in batch]
    nxt = [int(model.prefill(pool, s, p).argmax()) for s, p in zip(seqs, batch)]
    toks, layers = [[t] for t in nxt], [[model.num_layers] for _ in batch]
    row_of = {id(s): r for r, s in enumerate(seqs)}
    for _ in range(n - 1):
        rows = model.start(seqs, nxt)
        for last in bounds + [model.num_layers]:
            if not rows:
                break
            out = model.advance(pool, rows, last)
            for k, i in enumerate(out.finished):
                r = row_of[id(rows[i].seq)]
                nxt[r] = int(out.logits[k].argmax())
                toks[r].append(nxt[r])
                layers[r].append(out.exit_layers[k])
            rows = out.going_on
    return toks, layers, pool, seqs


@pytest.mark.parametrize("mode", ["copy", "exact"])
@pytest.mark.parametrize("bounds", [[2], [1, 3], [2, 3]])
def test_a_step_run_split_by_split_computes_what_one_pass_does(mode, bounds):
    lm = tiny_gemma3(window=64)

    def rule(e, h):
        """Scripted rule (a test fake): a row leaves where its normed state's first value is positive."""
        return h[:, 0] > 0
    model = EarlyExitCausalLM(lm, exits=(1, 3), kv_mode=mode, rule=rule)
    batch = prompts(3)
    whole = greedy(model, batch, 16)
    split = greedy_by_splits(model, batch, 16, bounds)
    assert split[0] == whole[0] and split[1] == whole[1]
    assert {l for row in whole[1] for l in row[1:]} == {1, 3, 4}     # every exit was taken
    torch.testing.assert_close(split[2].k, whole[2].k)
    torch.testing.assert_close(split[2].v, whole[2].v)
    for a, b in zip(split[3], whole[3]):
        assert (a.length, [(p.position, p.layer) for p in a.pending]) == (b.length, [(p.position, p.layer)
                                                                                   for p in b.pending])


def test_advance_refuses_rows_at_different_layers():
    model = EarlyExitCausalLM(tiny_gemma3(), exits=(2,))
    pool = model.new_pool(2, 8)
    rows = model.start([SequenceKV(pool.acquire()), SequenceKV(pool.acquire())], [5, 6])
    rows[1].layer = 2
    with pytest.raises(ValueError, match="one layer"):
        model.advance(pool, rows, 4)
