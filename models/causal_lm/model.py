"""An early-exit decoder-only LM over a transformers causal LM (CALM / LayerSkip style exits).

Exit e sits after `exits[e]` decoder layers. At a decode step every row's token
enters layer 0; at each exit a per-exit confidence estimator (a tiny MLP on the
normed hidden state, models/causal_lm/estimators.py) decides which rows leave.
Leaving rows skip the rest of the layers, and all rows pay the model's own final
norm and LM head once, together, at the end of the step: a row that leaves never
pays a vocabulary projection at an exit it passes, and the step reads the
262k-row head of Gemma 3 once, not once per exit.

The KV cache of the layers a token skipped (a later token attends to it there):
- `copy`: the exit hidden state stands in for the skipped layers' input and
  their K/V are projected from it at once (CALM's state propagation; approximate).
- `exact`: the token is kept pending with its exit hidden state; the next time
  its sequence's token runs past that layer, the pending tokens run the missing
  layers with it (EE-LLM / FREE catch-up), so the deep layers' K/V are what a
  full-depth pass computes.
With exits disabled every token runs every layer: generation is the model's own.

A decode step can also run a split at a time (`start` then `advance` over layer
ranges): a token that survives a split waits as an `InFlight` row, and rows of
different steps (and sequences) that reached the same layer run the next split
together (the engine's rebatching, runtime/llm_engine.py). A row computes the
same whether it runs in one step or split by split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .family import DecoderFamily, family_for
from .kv_pool import KVPool, SlotCache

KV_MODES = ("copy", "exact")


@dataclass
class Pending:
    """A token whose K/V exist only below `layer` (exact mode); `hidden` is its state there."""

    position: int
    layer: int
    hidden: torch.Tensor


@dataclass
class SequenceKV:
    """Where one sequence's K/V live: its pool slot, how many positions are filled, what is pending."""

    slot: int
    length: int = 0
    pending: list[Pending] = field(default_factory=list)


@dataclass
class StepOutput:
    logits: torch.Tensor            # [B, vocab] for each row's next token
    exit_layers: list[int]          # decoder layers each row's token ran (num_layers: full depth)


@dataclass
class InFlight:
    """One sequence's token inside a decode step: its hidden state [H] after `layer` layers, and
    (exact mode) the pending tokens it carries through the layers still to run."""

    seq: SequenceKV
    hidden: torch.Tensor
    layer: int = 0
    carry: list[Pending] = field(default_factory=list)


@dataclass
class SplitOutput:
    finished: list[int]             # indices (into advance's rows) of the rows whose token is done
    logits: torch.Tensor | None     # [len(finished), vocab]: their next-token logits (None: head=False)
    exit_layers: list[int]          # decoder layers each finished row ran
    going_on: list[InFlight]        # the rest, now at the split's last layer
    hidden: torch.Tensor | None = None   # [len(finished), H]: the finished rows' states, for the head


# (exit index, normed hidden [R, H]) -> bool [R]: which rows leave at that exit
ExitRule = Callable[[int, torch.Tensor], torch.Tensor]


class EarlyExitCausalLM:
    """Runs a causal LM's own decoder layers with token-level exits over a KVPool."""

    def __init__(self, lm: torch.nn.Module, exits: Sequence[int] = (), kv_mode: str = "copy",
                 rule: ExitRule | None = None):
        self.family: DecoderFamily = family_for(lm)
        self.lm = lm.eval()
        L = self.family.num_layers
        if sorted(set(exits)) != list(exits) or any(not 0 < e < L for e in exits):
            raise ValueError(f"exits must be increasing layer counts in 1..{L - 1}, got {list(exits)!r}")
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
        self.exits = tuple(exits)
        self.kv_mode = kv_mode
        self.rule = rule

    @property
    def num_layers(self) -> int:
        return self.family.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.lm_head.weight.dtype

    def new_pool(self, slots: int, max_len: int) -> KVPool:
        f = self.family
        return KVPool(f.num_layers, slots, max_len, f.kv_heads, f.head_dim, self.dtype,
                      self.lm.lm_head.weight.device)

    # ---- full-depth passes -------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, pool: KVPool, seq: SequenceKV, ids: Sequence[int]) -> torch.Tensor:
        """Run the prompt `ids` through every layer into seq's slot; the next token's logits [vocab]."""
        h = self._hidden_of(pool, seq, ids, keep=())[0]
        return self.family.logits(h[:, -1])[0]

    @torch.inference_mode()
    def trace(self, ids: Sequence[int], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Hidden states [T, H] of a text after each layer count in `layers` (full depth throughout)."""
        pool = self.new_pool(1, len(ids))
        _, kept = self._hidden_of(pool, SequenceKV(0), ids, keep=tuple(layers))
        return {layer: h[0] for layer, h in kept.items()}

    def _hidden_of(self, pool, seq, ids, keep):
        pos = torch.arange(seq.length, seq.length + len(ids), device=pool.k.device)[None]
        h = self.family.embed(torch.tensor([list(ids)], device=pool.k.device))
        slots = torch.tensor([seq.slot], device=pool.k.device)
        kept = {}
        for i in range(self.num_layers):
            if i in keep:
                kept[i] = h
            h = self.run_layer(pool, i, h, slots, pos)
        kept[self.num_layers] = h
        seq.length += len(ids)
        return h, kept

    def run_layer(self, pool: KVPool, i: int, h: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """Decoder layer i of the model on h [B, T, H] at `positions` [B, T] of `slots` [B]."""
        cache = SlotCache(pool, slots, positions)
        out = self.family.layers[i](
            h, position_embeddings=self.family.rotary(h, positions, i),
            attention_mask=cache.mask(self.family.window(i), h.dtype),
            position_ids=positions, cache=cache)
        return out[0] if isinstance(out, tuple) else out

    # ---- one decode step ---------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, pool: KVPool, seqs: Sequence[SequenceKV], tokens: Sequence[int],
               use_exits: bool = True) -> StepOutput:
        """Each row's next-token logits for input `tokens` (one per sequence), with exits."""
        return _DecodeStep(self, pool, list(seqs), use_exits and self.rule is not None).run(tokens)

    # ---- a decode step split by split ----------------------------------------------------

    @torch.inference_mode()
    def start(self, seqs: Sequence[SequenceKV], tokens: Sequence[int]) -> list[InFlight]:
        """The decode-step rows of input `tokens` (one per sequence), before layer 0."""
        dev = self.lm.lm_head.weight.device
        h = self.family.embed(torch.tensor(list(tokens), device=dev)[:, None])
        return [InFlight(s, h[r, 0]) for r, s in enumerate(seqs)]

    @torch.inference_mode()
    def advance(self, pool: KVPool, rows: Sequence[InFlight], last: int, use_exits: bool = True,
                head: bool = True) -> SplitOutput:
        """Run `rows` (all at the same layer) up to layer count `last`, with the exits after the
        layers they pass (and at `last`); a row that exits, or reaches the last layer, is finished.
        `head=False` leaves the LM head to the caller (`hidden`): the finished rows of several
        splits can then pay the 262k-row head of Gemma 3 once, together (`logits_of`)."""
        first = rows[0].layer
        if any(r.layer != first for r in rows) or not first < last <= self.num_layers:
            raise ValueError(f"rows must all be at one layer below last={last}, got {[r.layer for r in rows]}")
        step = _DecodeStep(self, pool, [r.seq for r in rows], use_exits and self.rule is not None,
                           carry=[list(r.carry) for r in rows])
        B = len(rows)
        h = torch.stack([r.hidden for r in rows])[:, None]
        out = torch.empty(B, self.family.hidden_size, dtype=h.dtype, device=h.device)
        exit_layers = [self.num_layers] * B
        h, active = step.run_range(h, torch.arange(B, device=h.device), first, last, out, exit_layers)
        going = active.tolist() if last < self.num_layers else []
        if last == self.num_layers:
            out[active] = h[:, 0]
            for r in active.tolist():
                step.carry[r] = []
        finished = [r for r in range(B) if r not in set(going)]
        for r in finished:
            rows[r].seq.length += 1
        hidden = out[finished]
        logits = (self.family.logits(hidden) if finished else out[:0]) if head else None
        return SplitOutput(finished, logits, [exit_layers[r] for r in finished],
                           [InFlight(rows[r].seq, h[k, 0], last, step.carry[r]) for k, r in enumerate(going)],
                           hidden)

    @torch.inference_mode()
    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [R, vocab] of finished rows' states [R, H] (the final norm and LM head)."""
        return self.family.logits(hidden)


class _DecodeStep:
    """One batched decode step; rows drop out of `active` as their tokens exit."""

    def __init__(self, model: EarlyExitCausalLM, pool: KVPool, seqs: list[SequenceKV], use_exits: bool,
                 carry: list[list[Pending]] | None = None):
        self.m, self.pool, self.seqs = model, pool, seqs
        self.exit_at = {layer: e for e, layer in enumerate(model.exits)} if use_exits else {}
        self.exact = model.kv_mode == "exact"
        dev = pool.k.device
        self.slots = torch.tensor([s.slot for s in seqs], device=dev)
        self.pos = torch.tensor([[s.length] for s in seqs], device=dev)
        # exact mode: pending tokens travelling with each row's token through the layers
        self.carry: list[list[Pending]] = carry if carry is not None else [[] for _ in seqs]

    def run(self, tokens) -> StepOutput:
        m, dev = self.m, self.pool.k.device
        B, L = len(self.seqs), m.num_layers
        h = m.family.embed(torch.tensor(list(tokens), device=dev)[:, None])
        out = torch.empty(B, m.family.hidden_size, dtype=h.dtype, device=dev)
        exit_layers = [L] * B
        h, active = self.run_range(h, torch.arange(B, device=dev), 0, L, out, exit_layers)
        out[active] = h[:, 0]
        for r in active.tolist():
            self.carry[r] = []
        for s in self.seqs:
            s.length += 1
        return StepOutput(m.family.logits(out), exit_layers)

    def run_range(self, h, active, first: int, last: int, out, exit_layers):
        """Layers [first, last) on the `active` rows' states h, the exits after layer counts in
        (first, last] applied on the way (a row leaving writes its state to `out`); what is left."""
        for i in range(first, last + 1):
            if i in self.exit_at and i > first:
                h, active = self._exit(i, h, active, out, exit_layers)
                if len(active) == 0:
                    break
            if i < last:
                h = self._layer(i, h, active)
        return h, active

    def _exit(self, i, h, active, out, exit_layers):
        leave = self.m.rule(self.exit_at[i], self.m.family.backbone.norm(h[:, 0])).to(torch.bool)
        if not bool(leave.any()):
            return h, active
        rows, hl = active[leave], h[leave]
        out[rows] = hl[:, 0]
        for r in rows.tolist():
            exit_layers[r] = i
        if self.exact:
            self._park(i, rows, hl)
        else:
            self._copy_kv(i, rows, hl)
        return h[~leave], active[~leave]

    def _copy_kv(self, i, rows, hl):
        """Copy mode: the skipped layers' K/V at this position, projected from the exit state."""
        cache = SlotCache(self.pool, self.slots[rows], self.pos[rows])
        for j in range(i, self.m.num_layers):
            k, v = self.m.family.project_kv(j, hl, self.pos[rows])
            cache.write(j, k, v)

    def _park(self, i, rows, hl):
        """Exact mode: the row's token (and what it carried) waits at layer i for a deeper pass."""
        for r, hr in zip(rows.tolist(), hl[:, 0]):
            seq = self.seqs[r]
            seq.pending += [Pending(p.position, i, p.hidden) for p in self.carry[r]]
            seq.pending.append(Pending(seq.length, i, hr.clone()))
            self.carry[r] = []

    def _layer(self, i, h, active):
        if not self.exact:
            return self.m.run_layer(self.pool, i, h, self.slots[active], self.pos[active])
        carrying = [self._absorb(i, r) for r in active.tolist()]
        plain = torch.tensor([not c for c in carrying], device=h.device)
        out = torch.empty_like(h)
        if bool(plain.any()):
            rows = active[plain]
            out[plain] = self.m.run_layer(self.pool, i, h[plain], self.slots[rows], self.pos[rows])
        for k, r in enumerate(active.tolist()):
            if carrying[k]:
                out[k] = self._catch_up(i, r, h[k])
        return out

    def _absorb(self, i, r) -> bool:
        """Move row r's pending tokens that stopped at layer i into its carry; is it carrying?"""
        seq = self.seqs[r]
        joining = [p for p in seq.pending if p.layer == i]
        if joining:
            seq.pending = [p for p in seq.pending if p.layer != i]
            self.carry[r] = sorted(self.carry[r] + joining, key=lambda p: p.position)
        return bool(self.carry[r])

    def _catch_up(self, i, r, hr):
        """Layer i on row r's carried tokens and its current token together, in position order."""
        carry = self.carry[r]
        x = torch.stack([p.hidden for p in carry] + [hr[0]])[None]
        pos = torch.tensor([[p.position for p in carry] + [self.seqs[r].length]], device=x.device)
        y = self.m.run_layer(self.pool, i, x, self.slots[r:r + 1], pos)[0]
        for p, hp in zip(carry, y[:-1]):
            p.hidden = hp
        return y[-1:]
