"""What differs between decoder-only families, behind one small adapter.

The early-exit model runs the transformers model's own decoder layers, final
norm and LM head; only how rotary position embeddings are asked for, which
layers use a sliding window, and how a layer's keys/values are projected
(copy mode) differ between Gemma 3 and Llama-style models. GPT-2 (absolute
positions, fused QKV) would be a third adapter; only the families listed in
FAMILIES are accepted.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import CheckpointError


class DecoderFamily:
    """Adapter over a transformers `*ForCausalLM` whose layers take rotary embeddings."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.config = lm.config
        self.backbone = lm.model
        self.layers = lm.model.layers
        self._rope_fn = importlib.import_module(type(self.layers[0]).__module__).apply_rotary_pos_emb

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed_tokens(ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor, layer: int):
        return self.backbone.rotary_emb(hidden, positions)

    def window(self, layer: int) -> int | None:
        """The layer's sliding attention window in tokens, None for full attention."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own final norm and LM head (and logit soft-capping where it has one)."""
        logits = self.lm.lm_head(self.backbone.norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def project_kv(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor):
        """Layer `layer`'s keys and values for `hidden` [B, T, H], as its attention computes them.

        Used by copy mode: the exit hidden state stands in for a skipped layer's input.
        """
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, self.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        cos, sin = self.rotary(hidden, positions, layer)
        _, k = self._rope_fn(k, k, cos, sin)
        return k, v


class Gemma3Family(DecoderFamily):
    """Gemma 3: local (sliding) and global layers, each type with its own rotary frequencies."""

    def rotary(self, hidden, positions, layer):
        return self.backbone.rotary_emb(hidden, positions, self.config.layer_types[layer])

    def window(self, layer):
        if self.config.layer_types[layer] == "sliding_attention":
            return self.config.sliding_window
        return None


class LlamaFamily(DecoderFamily):
    """Llama: one rotary embedding, full attention in every layer."""


FAMILIES = {"gemma3_text": Gemma3Family, "llama": LlamaFamily}


def family_for(lm: nn.Module) -> DecoderFamily:
    kind = lm.config.model_type
    if kind not in FAMILIES:
        raise CheckpointError(f"causal LM type {kind!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[kind](lm)
