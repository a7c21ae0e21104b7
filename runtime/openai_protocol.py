"""OpenAI-compatible requests: parsing and checking `/v1/completions` and `/v1/chat/completions` bodies.

Every bad value is refused with a message naming its field, before any work.
Fields that OpenAI clients may send but that E3 does not implement are accepted
only at their neutral value (for example `n` must be 1, `logprobs` null), so a
request never silently gets something other than what it asked for; a field
OpenAI does not define is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 4


class ProtocolError(ValueError):
    """A request body that is not a valid completion request; the message names the field."""


# field -> the one value accepted (what OpenAI means by "off")
NEUTRAL = {"n": 1, "best_of": 1, "logprobs": None, "echo": False, "suffix": None,
           "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "user": Any}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options"}
# chat: logprobs is a boolean there; max_completion_tokens is the newer name of max_tokens
CHAT_NEUTRAL = {"n": 1, "logprobs": False, "top_logprobs": None, "presence_penalty": 0,
                "frequency_penalty": 0, "logit_bias": None, "user": Any}
CHAT_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
              "stop", "stream", "stream_options"}
ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 256


@dataclass
class CompletionParams:
    """What to generate and how: a completion's prompt, or a chat's messages (then prompt is None)."""

    prompt: str | None = None
    messages: list[dict] | None = None   # chat: [{"role", "content": str}], content parts joined
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False          # stream_options.include_usage: a last chunk with the usage


def parse_completion(body: Any, max_tokens_limit: int) -> CompletionParams:
    """The parameters of completion request `body` (decoded JSON); ProtocolError if it is bad."""
    _check_fields(body, KNOWN, NEUTRAL)
    p = CompletionParams(prompt=_prompt(body.get("prompt")))
    _sampling(p, body, int_field(body, "max_tokens", 16, 1, max_tokens_limit))
    return p


def parse_chat(body: Any, max_tokens_limit: int) -> CompletionParams:
    """The parameters of chat completion request `body` (decoded JSON); ProtocolError if it is bad."""
    _check_fields(body, CHAT_KNOWN, CHAT_NEUTRAL)
    p = CompletionParams(messages=_messages(body.get("messages")))
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ProtocolError("give max_tokens or max_completion_tokens, not both")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    _sampling(p, body, int_field(body, name, 16, 1, max_tokens_limit))
    return p


def _check_fields(body, known, neutral) -> None:
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    for name, value in body.items():
        if name in known:
            continue
        if name not in neutral:
            raise ProtocolError(f"unknown field {name!r}")
        if neutral[name] is not Any and value != neutral[name] and value is not None:
            raise ProtocolError(f"{name} must be {neutral[name]!r} (not supported), got {short(value)}")


def _sampling(p: CompletionParams, body: dict, max_tokens: int) -> None:
    p.model = optional_field(body, "model", str, "a string")
    p.max_tokens = max_tokens
    p.temperature = number_field(body, "temperature", 0.0, 0.0, 2.0)
    p.top_p = number_field(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    p.seed = optional_field(body, "seed", int, "an integer")
    p.stop = stop_field(body.get("stop"))
    p.stream = bool_field(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not p.stream:
            raise ProtocolError("stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ProtocolError(f"stream_options must be {{\"include_usage\": true|false}}, got {short(options)}")
        p.include_usage = bool_field(options, "include_usage", False, "stream_options.include_usage")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ProtocolError(f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, "
                            f"got {short(value)}")
    if len(value) > MAX_MESSAGES:
        raise ProtocolError(f"messages holds at most {MAX_MESSAGES} messages, got {len(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ProtocolError(f"messages[{i}] must be an object, got {short(m)}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ProtocolError(f"messages[{i}] has unsupported field(s) {sorted(extra)}")
        if m.get("role") not in ROLES:
            raise ProtocolError(f"messages[{i}].role must be one of {list(ROLES)}, got {short(m.get('role'))}")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(value, i: int) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(c, dict) for c in value):
        if any(c.get("type") != "text" or not isinstance(c.get("text"), str) for c in value):
            raise ProtocolError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                "are supported")
        return "".join(c["text"] for c in value)
    raise ProtocolError(f"messages[{i}].content must be a string or a list of text parts, got {short(value)}")


def _prompt(value) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise ProtocolError(f"prompt must be a string (or a list of one string), got {short(value)}")
    if not value:
        raise ProtocolError("prompt must not be empty")
    return value


# ---- field checks shared with the KServe generate extension (kserve_generate.py) ----------

def optional_field(body, name, kind, what):
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be {what}, got {short(value)}")
    return value


def int_field(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be an integer, got {short(value)}")
    if not low <= value <= high:
        raise ProtocolError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def number_field(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"{name} must be a number, got {short(value)}")
    if value > high or value < low or (low_open and value == low):
        raise ProtocolError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def bool_field(body, name, default, label=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(f"{label or name} must be true or false, got {short(value)}")
    return value


def stop_field(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ProtocolError(f"stop must be a non-empty string or a list of them, got {short(value)}")
    if len(stops) > MAX_STOP:
        raise ProtocolError(f"stop holds at most {MAX_STOP} strings, got {len(stops)}")
    return stops


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class StopFilter:
    """Incremental detokenized text with stop strings: what may be sent now, and whether a stop
    string was reached. Text that could be the start of a stop string is held back until it is
    known not to be one; so is a trailing partial UTF-8 character."""

    def __init__(self, decode, stops: list[str]):
        self._decode, self._stops = decode, stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._ids: list[int] = []
        self._sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that token `token` makes safe to send."""
        self._ids.append(token)
        text = self._decode(self._ids)
        hits = [i for i in (text.find(s, max(0, self._sent - self._hold)) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(text, min(hits))
        safe = len(text) - self._hold
        while safe > self._sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(text, max(safe, self._sent))

    def flush(self) -> str:
        """At the end: everything not yet sent (no stop string came)."""
        if self.stopped:
            return ""
        return self._take(self._decode(self._ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        out = text[self._sent:end]
        self._sent = max(self._sent, end)
        return out
