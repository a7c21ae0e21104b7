"""Key/value memory for generation: a fixed pool of sequence slots, and the cache one call sees.

The pool is allocated once (layers x slots x max_len tokens), so the KV memory
of the whole engine is bounded by construction: a sequence is admitted only
when a slot is free and its prompt plus `max_tokens` fit in `max_len`.
Sequences of different lengths share a batch: each row writes at its own
positions of its own slot, and the attention mask (causal, by position) hides
whatever an earlier occupant of the slot left beyond the row's position.
"""
from __future__ import annotations

import torch


class KVPool:
    """K and V tensors [layers, slots, kv_heads, max_len, head_dim], handed out a slot at a time."""

    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.slots = slots
        self._free = list(range(slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def acquire(self) -> int | None:
        """A free slot, or None when every slot holds a sequence."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not held")
        self._free.append(slot)


class SlotCache:
    """The `cache` argument of a transformers attention layer, for one call on some rows.

    `update` writes the call's new keys/values at `positions` [B, T] of each row's
    slot and returns the rows' keys/values up to `kv_len`; the model's own
    attention then runs on them under the mask that `SlotCache.mask` built.
    """

    def __init__(self, pool: KVPool, slots: torch.Tensor, positions: torch.Tensor):
        self.pool = pool
        self.slots = slots
        self.positions = positions
        self.kv_len = int(positions.max()) + 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.write(layer_idx, key_states, value_states)
        return self.read(layer_idx)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, kv_heads, T, head_dim] at the rows' positions."""
        rows = self.slots[:, None].expand_as(self.positions)
        self.pool.k[layer][rows, :, self.positions] = k.transpose(1, 2).to(self.pool.k.dtype)
        self.pool.v[layer][rows, :, self.positions] = v.transpose(1, 2).to(self.pool.v.dtype)

    def read(self, layer: int):
        k = self.pool.k[layer][:, :, : self.kv_len].index_select(0, self.slots)
        v = self.pool.v[layer][:, :, : self.kv_len].index_select(0, self.slots)
        return k, v

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B, 1, T, kv_len]: a query sees keys at its own position and before
        (within `window` tokens when the layer has one), which both eager and SDPA attention take."""
        q = self.positions[:, None, :, None]
        k = torch.arange(self.kv_len, device=q.device)[None, None, None, :]
        seen = k <= q
        if window is not None:
            seen &= k > q - window
        zero = torch.zeros((), dtype=dtype, device=q.device)
        return torch.where(seen, zero, torch.finfo(dtype).min)
