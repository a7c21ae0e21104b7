"""A served causal LM: its engine client, tokenizer, chat format and metrics, as text in and text out.

Every front end goes through `LLMService`: the OpenAI app (openai_http.py), the
KServe generate extension (kserve_generate.py), and a program that embeds E3
(the sidecar):

    async with load_service("gemma3-270m") as llm:
        async for piece in llm.generate("The capital of France is", max_tokens=8):
            print(repr(piece.text), piece.exit_layer)

`open()` admits a request at once or raises (GenerationRequestError: a 400;
EngineFullError: every KV slot is held, a 503; NotReadyError: not started or
draining, a 503), so an HTTP answer can still carry the right status. The
returned `Generation` yields one `Piece` per token: the text it makes safe to
send (stop strings and partial UTF-8 characters are held back, so a piece may be
empty), the token and the decoder layers it ran. Leaving `async with` early, or
`aclose()`, aborts the sequence and frees its KV slot at the engine's next step.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Sequence

from e3.models.causal_lm import LLM_MODELS

from .config import LLMConfig
from .errors import NotReadyError
from .llm_client import EngineClient, TokenStream
from .llm_engine import EngineFullError, GenerationEngine, GenerationRequest
from .metrics import LLMMetrics
from .openai_protocol import CompletionParams, ProtocolError, StopFilter

# Gemma's documented turn format (ai.google.dev/gemma/docs/core/prompt-structure), used when the
# tokenizer carries no chat template: Gemma has no system role, so a system message's text opens
# the first user turn, as Gemma's own template does.
GEMMA_TURNS = "Gemma's documented turn format, as the tokenizer carries no chat template"
# Prompts longer than this (characters) are tokenized on a thread: a 1 MB prompt takes the tokenizer
# long enough to stall every stream on the event loop (short ones cost less than the thread hop).
TOKENIZE_INLINE_CHARS = 16 * 1024


@dataclass(frozen=True)
class Piece:
    """One generated token as text: `text` is what it makes safe to send (maybe ""); `token` and
    `exit_layer` (decoder layers it ran; the model's depth when it ran them all) are None only on a
    closing piece that carries no token (the sequence ended by the per-token deadline). `finish` is
    None until the last piece: "length", "stop" or "deadline"."""

    text: str
    token: int | None
    exit_layer: int | None
    finish: str | None = None


class LLMService:
    """start() / open() or generate() / drain() / close() over one engine client."""

    def __init__(self, client: EngineClient, tokenizer, name: str, stop_tokens: Sequence[int]):
        self.client, self.tokenizer, self.name = client, tokenizer, name
        self.stop_tokens = tuple(stop_tokens)
        self.metrics = LLMMetrics(client.engine.pool.slots)
        self.accepting = False
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat_format = "the tokenizer's own chat template" if has_template else GEMMA_TURNS

    @property
    def config(self) -> LLMConfig:
        return self.client.engine.config

    @property
    def ready(self) -> bool:
        return self.accepting and self.client.running

    async def start(self) -> None:
        await self.client.start()
        self.accepting = True

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests (503), then wait for the admitted ones to end (at most `timeout_s`,
        default llm.drain_timeout_s); True if every one ended."""
        self.accepting = False
        return await self.client.drain(self.config.drain_timeout_s if timeout_s is None else timeout_s)

    async def close(self) -> None:
        """Stop the engine; sequences still running end with an error."""
        self.accepting = False
        await self.client.close()

    async def __aenter__(self) -> "LLMService":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.drain()
        await self.close()

    # ---- text ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt tokens of a chat, ending where the model's turn begins."""
        if self.chat_format == GEMMA_TURNS:
            return self.encode(gemma_turns(messages))
        from jinja2 import TemplateError
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as exc:      # the template's own refusal, e.g. roles that do not alternate
            raise ProtocolError(f"messages do not fit the model's chat template: {exc}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):     # a BatchEncoding in some versions
            ids = ids["input_ids"]
        return list(ids)

    async def prompt_ids(self, params: CompletionParams) -> list[int]:
        """The prompt tokens of a completion (params.prompt) or a chat (params.messages), long ones
        tokenized off the event loop."""
        if params.messages is not None:
            size, work = sum(len(m["content"]) for m in params.messages), lambda: self.chat_ids(params.messages)
        else:
            size, work = len(params.prompt), lambda: self.encode(params.prompt)
        return await asyncio.to_thread(work) if size > TOKENIZE_INLINE_CHARS else work()

    # ---- generation ------------------------------------------------------------------------

    def open(self, prompt_ids: list[int], params: CompletionParams) -> "Generation":
        """Admit a request for `prompt_ids` now, or raise (see the module's docstring)."""
        if not self.accepting:
            self.metrics.outcome("draining")
            raise NotReadyError(f"model {self.name!r} is not taking requests (starting or draining)")
        req = GenerationRequest(prompt_ids, params.max_tokens, params.temperature, params.top_p,
                                params.seed, self.stop_tokens)
        try:
            stream = self.client.generate(req)
        except EngineFullError:
            self.metrics.outcome("full")
            raise
        self.metrics.outcome("admitted")
        self.metrics.held.set(self.client.held)
        return Generation(self, stream, StopFilter(self.decode, params.stop), len(prompt_ids))

    def generate(self, prompt: str, *, max_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> "Generation":
        """The sidecar call: `async for piece in llm.generate(prompt, ...)` (greedy by default).
        Raises at once when the request cannot be admitted; `async with` around it aborts the
        sequence when the block is left early."""
        stops = list(stop)
        if not all(isinstance(s, str) and s for s in stops):
            raise ProtocolError(f"stop must hold non-empty strings, got {stops!r}")
        params = CompletionParams(prompt=prompt, max_tokens=max_tokens, temperature=float(temperature),
                                  top_p=float(top_p), seed=seed, stop=stops)
        return self.open(self.encode(prompt), params)


class Generation:
    """The pieces of one admitted request, in order (an async iterator; `async with` aborts early
    leavers). After the end: `finish`, and every `tokens` / `exit_layers` made."""

    def __init__(self, service: LLMService, stream: TokenStream, stops: StopFilter, prompt_tokens: int):
        self._service, self._stream, self._stops = service, stream, stops
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.exit_layers: list[int] = []
        self.finish: str | None = None
        self._last = time.monotonic()

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> Piece:
        if self.finish is not None:
            raise StopAsyncIteration
        try:
            ev = await self._stream.__anext__()
        except StopAsyncIteration:
            # ended without a token: the per-token deadline (an abort is only ever ours)
            self._end(self._stream.finish or "abort")
            return Piece(self._stops.flush(), None, None, self.finish)
        except BaseException:
            self._end("error")
            raise
        now = time.monotonic()
        self._service.metrics.token(ev.exit_layer, now - self._last, first=not self.tokens)
        self._last = now
        self.tokens.append(ev.token)
        self.exit_layers.append(ev.exit_layer)
        text = self._stops.push(ev.token)
        finish = "stop" if self._stops.stopped else ev.finish
        if finish is not None:
            text += self._stops.flush()
            self._end(finish)
            if ev.finish is None:            # a stop string: the sequence still runs; free it now
                await self._stream.aclose()
        return Piece(text, ev.token, ev.exit_layer, finish)

    def _end(self, finish: str) -> None:
        self.finish = finish
        self._service.metrics.outcome(finish)
        self._service.metrics.held.set(self._service.client.held)

    async def aclose(self) -> None:
        if self.finish is None:
            self._end("abort")
        await self._stream.aclose()

    async def __aenter__(self) -> "Generation":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def gemma_turns(messages: list[dict]) -> str:
    """A chat in Gemma's turn format, ending with the opening of the model's turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    turns, first = [], True
    for m in messages:
        if m["role"] in ("system", "developer"):
            continue
        role = "model" if m["role"] == "assistant" else "user"
        text = m["content"]
        if first and system and role == "user":
            text = f"{system}\n\n{text}"
        first = False
        turns.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    if not turns:
        raise ProtocolError("messages must hold at least one user or assistant message")
    return "".join(turns) + "<start_of_turn>model\n"


def load_service(name: str = "gemma3-270m", config: LLMConfig | None = None) -> LLMService:
    """The built-in causal LM `name` as an unstarted service (blocking: loads the weights, and on
    first use builds their cache and trains the exit estimators)."""
    config = (config or LLMConfig()).validate()
    if name not in LLM_MODELS:
        from e3.models.errors import ModelNotFoundError
        raise ModelNotFoundError(f"unknown causal LM {name!r}; built in: {', '.join(LLM_MODELS)}")
    from e3.models.causal_lm import gemma3_270m
    tok, model = gemma3_270m.load(config.kv_mode, exits=config.use_exits)
    engine = GenerationEngine(model, config)
    return LLMService(EngineClient(engine), tok, name, end_tokens(model.lm, tok))


def end_tokens(lm, tokenizer=None) -> tuple[int, ...]:
    """The model's end-of-text tokens: its generation config's, and Gemma's <end_of_turn> where the
    vocabulary has it (this GGUF's config names only <eos>; a chat answer ends with <end_of_turn>)."""
    eos = lm.generation_config.eos_token_id
    ids = list(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and hasattr(tokenizer, "convert_tokens_to_ids"):
        turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(turn, int) and turn != tokenizer.unk_token_id and turn not in ids:
            ids.append(turn)
    return tuple(ids)
