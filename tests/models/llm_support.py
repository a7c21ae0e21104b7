"""Tiny randomly initialised causal LMs for exactness tests (never for a reported figure)."""
from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM


def tiny_gemma3(seed: int = 0, window: int = 6, vocab: int = 97) -> Gemma3ForCausalLM:
    """4 layers, hidden 32, a sliding window of `window` tokens on the local layers."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    """n prompts of different lengths (3 to 3 + n) over the tiny vocabulary, no special tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (3 + i,), generator=g).tolist() for i in range(n)]


def library_greedy(lm, prompt: list[int], n: int) -> list[int]:
    """The library's own greedy generation, one prompt at a time (no padding involved); it may
    stop early at the end-of-sequence token."""
    ids = torch.tensor([prompt])
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


class ByteTokenizer:
    """A test fake standing for a real tokenizer: token = UTF-8 byte + 3 (0-2 are special)."""

    vocab = 259

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1] + [b + 3 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def first_positive(e, h):
    """Scripted exit rule (a test fake): rows whose first hidden value is positive leave at the exit."""
    return h[:, 0] > 0
