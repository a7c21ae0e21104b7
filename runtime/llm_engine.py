"""The generation engine: continuous batching over decode steps of an early-exit causal LM.

`GenerationEngine.step()` is a plain loop body with no asyncio in it (vLLM's
engine-core pattern), so it can move into a worker process later: at each step
boundary it frees aborted sequences, prefills newly admitted ones (their first
token), then runs one batched decode step over every running sequence, in which
a row whose token exits early skips the later layers (models/causal_lm/model.py).

KV memory is bounded by the pool: `kv_slots` sequences of at most `max_len`
tokens (prompt plus `max_tokens`). A request is admitted only into a free slot;
with none free it is refused (EngineFullError, an HTTP 503) rather than queued.
With `llm.split_layers` a decode step runs split by split and is rebatched
across steps: the tokens that survive split k wait, and the waiting tokens of
several steps run split k+1 together once `merge_rows` of them wait (or the
oldest has waited `max_wait_steps` steps, or no sequence could start a token
without them), while a sequence whose token exited starts its next token at the
next step. A sequence has at most one token in flight, and its KV lives in its
own slot, so merging never reorders a sequence's tokens or mixes sequences' KV.
Each token has a deadline (`llm.token_deadline_ms` after the one before; the
first after admission): a token that comes later is not emitted, the sequence
ends with FinishedEvent(finish="deadline") and its slot is freed.
`EngineClient` drives the engine on one thread from asyncio through queues.
"""
from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from e3.models.causal_lm.model import EarlyExitCausalLM, InFlight, SequenceKV

from .config import LLMConfig
from .errors import ConfigError


class EngineFullError(RuntimeError):
    """Every KV slot holds a sequence: the request is refused, not queued."""


class GenerationRequestError(ValueError):
    """A request the engine cannot run as given (too long for the KV slots, bad sampling values)."""


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: Sequence[int] = ()   # generation ends after emitting one of these
    id: int = field(default_factory=itertools.count().__next__)


@dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token: int
    index: int                 # 0 for the first generated token
    exit_layer: int            # decoder layers the token's hidden state ran (num_layers: full depth)
    finish: str | None = None  # "length", "stop", or None while more tokens follow


@dataclass(frozen=True)
class FinishedEvent:
    """The sequence ended without a token: "abort" (its client went away) or "deadline" (its next
    token was not made within llm.token_deadline_ms); its KV slot is free again."""

    request_id: int
    finish: str = "abort"


@dataclass
class _Sequence:
    req: GenerationRequest
    kv: SequenceKV
    generator: torch.Generator | None
    produced: int = 0
    last: int = -1             # the token to feed at the next decode step
    due: float | None = None   # the engine clock's time by which the next token must be made


@dataclass
class _Waiting:
    """A token that survived a split, waiting for the next one since engine step `since`."""

    seq: _Sequence
    row: InFlight
    since: int


class GenerationEngine:
    """Holds sequences in KV slots and advances them one decode step per `step()`.

    `clock` (seconds, monotonic) times the per-token deadline; tests inject one."""

    def __init__(self, model: EarlyExitCausalLM, config: LLMConfig | None = None, clock=time.monotonic):
        self.model = model
        self.config = (config or LLMConfig()).validate()
        self.clock = clock
        self.pool = model.new_pool(self.config.kv_slots, self.config.max_len)
        self._new: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}
        self._aborted: set[int] = set()
        self.exit_counts: Counter[int] = Counter()   # exit layer -> decode tokens that left there
        self.steps = 0
        self.aborts = 0                              # sequences freed before their end
        self.deadline_misses = 0                     # sequences ended by the per-token deadline
        L = model.num_layers
        splits = self.config.split_layers or []
        if any(b >= L for b in splits):
            raise ConfigError(f"llm.split_layers must be layer counts in 1..{L - 1} for this "
                              f"{L}-layer model, got {splits!r}")
        self.bounds = [*splits, L]                   # split k runs layers [bounds[k-1], bounds[k])
        self.merge_rows = self.config.merge_rows or max(1, self.config.kv_slots // 2)
        self._waiting: list[list[_Waiting]] = [[] for _ in self.bounds]   # [k]: waiting for split k
        self._in_flight: set[int] = set()            # requests with a token inside a decode step
        self.split_batches: Counter[tuple[int, int]] = Counter()  # (split, rows) -> batches run
        self.merged_batches = 0                      # split batches holding tokens of several steps

    def check(self, req: GenerationRequest) -> None:
        """Raise GenerationRequestError naming what in `req` the engine cannot run."""
        n = len(req.prompt)
        if n == 0:
            raise GenerationRequestError("prompt must hold at least one token")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise GenerationRequestError(f"max_tokens must be a positive integer, got {req.max_tokens!r}")
        if n + req.max_tokens > self.config.max_len:
            raise GenerationRequestError(
                f"prompt ({n} tokens) plus max_tokens ({req.max_tokens}) exceeds the context limit "
                f"of {self.config.max_len} tokens")
        if not 0.0 <= req.temperature <= 2.0:
            raise GenerationRequestError(f"temperature must be in [0, 2], got {req.temperature!r}")
        if not 0.0 < req.top_p <= 1.0:
            raise GenerationRequestError(f"top_p must be in (0, 1], got {req.top_p!r}")

    def add(self, req: GenerationRequest) -> None:
        """Admit `req` into a free KV slot (its prefill runs at the next step)."""
        self.check(req)
        slot = self.pool.acquire()
        if slot is None:
            raise EngineFullError(f"all {self.pool.slots} KV slots are in use")
        gen = None
        if req.temperature > 0:
            gen = torch.Generator(device=self.pool.k.device)
            gen.manual_seed(req.seed if req.seed is not None else torch.seed())
        self._new.append(_Sequence(req, SequenceKV(slot), gen, due=self._deadline_from(self.clock())))

    def abort(self, request_id: int) -> None:
        """Free the request's sequence at the next step boundary (a client went away)."""
        self._aborted.add(request_id)

    @property
    def busy(self) -> bool:
        return bool(self._new or self._running or self._aborted)

    @property
    def held(self) -> int:
        return self.pool.slots - self.pool.free_slots

    def step(self) -> list[TokenEvent | FinishedEvent]:
        events: list = self._drop_aborted()
        for seq in self._new:
            logits = self.model.prefill(self.pool, seq.kv, seq.req.prompt)
            events.append(self._emit(seq, logits, self.model.num_layers))
        self._new = []
        if len(self.bounds) > 1:
            return self._split_step(events)
        # every running sequence, the ones prefilled just now included, advances one token
        ready = list(self._running.values())
        if ready:
            out = self.model.decode(self.pool, [s.kv for s in ready], [s.last for s in ready],
                                    use_exits=self.config.use_exits)
            self.steps += 1
            for r, seq in enumerate(ready):
                self._emit_counted(events, seq, out.logits[r], out.exit_layers[r])
        return events

    def _split_step(self, events: list) -> list:
        """One engine step with rebatching: split 0 for every sequence with no token in flight,
        then each deeper split whose waiting tokens are due, shallow to deep; the tokens finished
        in any split of the step then pay the LM head once, together (on a CPU that reads the
        weights once per batch, the head of Gemma 3 costs more than its 18 layers)."""
        finished: list[tuple[_Sequence, torch.Tensor, int]] = []
        ready = [s for s in self._running.values() if s.req.id not in self._in_flight]
        if ready:
            rows = self.model.start([s.kv for s in ready], [s.last for s in ready])
            self._advance(0, [_Waiting(s, r, self.steps) for s, r in zip(ready, rows)], finished)
        for k in range(1, len(self.bounds)):
            if self._waiting[k] and self._split_due(k):
                batch, self._waiting[k] = self._waiting[k], []
                self.merged_batches += len({w.since for w in batch}) > 1
                self._advance(k, batch, finished)
        if finished:
            logits = self.model.logits_of(torch.stack([h for _, h, _ in finished]))
            for (seq, _, layer), row in zip(finished, logits):
                self._emit_counted(events, seq, row, layer)
        self.steps += 1
        return events

    def _split_due(self, k: int) -> bool:
        waiting = self._waiting[k]
        return (len(waiting) >= self.merge_rows or self.steps - waiting[0].since >= self.config.max_wait_steps
                or all(s.req.id in self._in_flight for s in self._running.values()))

    def _advance(self, k: int, batch: list[_Waiting], finished: list) -> None:
        """Split k on `batch`; its finished tokens join `finished` (sequence, state, exit layer)."""
        out = self.model.advance(self.pool, [w.row for w in batch], self.bounds[k],
                                 use_exits=self.config.use_exits, head=False)
        self.split_batches[(k, len(batch))] += 1
        for j, i in enumerate(out.finished):
            seq = batch[i].seq
            self._in_flight.discard(seq.req.id)
            finished.append((seq, out.hidden[j], out.exit_layers[j]))
        going = [i for i in range(len(batch)) if i not in set(out.finished)]
        for i, row in zip(going, out.going_on):
            self._in_flight.add(batch[i].seq.req.id)
            self._waiting[k + 1].append(_Waiting(batch[i].seq, row, batch[i].since))

    def _emit_counted(self, events: list, seq: _Sequence, logits: torch.Tensor, layer: int) -> None:
        ev = self._emit(seq, logits, layer)
        if isinstance(ev, TokenEvent):
            self.exit_counts[layer] += 1
        events.append(ev)

    def _drop_aborted(self) -> list[FinishedEvent]:
        events = []
        for rid in self._aborted:
            seq = self._running.pop(rid, None)
            if rid in self._in_flight:           # its token waits for a deeper split: drop it there
                self._in_flight.discard(rid)
                for k, waiting in enumerate(self._waiting):
                    self._waiting[k] = [w for w in waiting if w.seq.req.id != rid]
            if seq is None:
                match = [s for s in self._new if s.req.id == rid]
                self._new = [s for s in self._new if s.req.id != rid]
                seq = match[0] if match else None
            if seq is not None:
                self.pool.release(seq.kv.slot)
                self.aborts += 1
                events.append(FinishedEvent(rid))
        self._aborted.clear()
        return events

    def _deadline_from(self, now: float) -> float | None:
        deadline = self.config.token_deadline_s
        return None if deadline is None else now + deadline

    def _emit(self, seq: _Sequence, logits: torch.Tensor, layer: int) -> TokenEvent | FinishedEvent:
        now = self.clock()
        if seq.due is not None and now > seq.due:
            # Too late to count as this sequence's next token: the sequence ends here.
            self._running.pop(seq.req.id, None)
            self.pool.release(seq.kv.slot)
            self.deadline_misses += 1
            return FinishedEvent(seq.req.id, "deadline")
        seq.due = self._deadline_from(now)
        token = self._sample(seq, logits)
        seq.produced += 1
        finish = "stop" if token in seq.req.stop_tokens else (
            "length" if seq.produced >= seq.req.max_tokens else None)
        if finish:
            self._running.pop(seq.req.id, None)
            self.pool.release(seq.kv.slot)
        else:
            seq.last = token
            self._running[seq.req.id] = seq
        return TokenEvent(seq.req.id, token, seq.produced - 1, layer, finish)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        if seq.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / seq.req.temperature, -1)
        if seq.req.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < seq.req.top_p    # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))
