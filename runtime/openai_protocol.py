"""OpenAI-compatible completion requests: parsing and checking a `/v1/completions` body.

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
           "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "user": Any,
           "stream_options": Any}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}


@dataclass
class CompletionParams:
    prompt: str
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False


def parse_completion(body: Any, max_tokens_limit: int) -> CompletionParams:
    """The parameters of completion request `body` (decoded JSON); ProtocolError if it is bad."""
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    for name, value in body.items():
        if name in KNOWN:
            continue
        if name not in NEUTRAL:
            raise ProtocolError(f"unknown field {name!r}")
        if NEUTRAL[name] is not Any and value != NEUTRAL[name] and value is not None:
            raise ProtocolError(f"{name} must be {NEUTRAL[name]!r} (not supported), got {value!r}")
    p = CompletionParams(prompt=_prompt(body.get("prompt")))
    p.model = _opt(body, "model", str, "a string")
    p.max_tokens = _int(body, "max_tokens", 16, 1, max_tokens_limit)
    p.temperature = _num(body, "temperature", 0.0, 0.0, 2.0)
    p.top_p = _num(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    p.seed = _opt(body, "seed", int, "an integer")
    p.stop = _stop(body.get("stop"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ProtocolError(f"stream must be true or false, got {stream!r}")
    p.stream = bool(stream)
    return p


def _prompt(value) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise ProtocolError(f"prompt must be a string (or a list of one string), got {_short(value)}")
    if not value:
        raise ProtocolError("prompt must not be empty")
    return value


def _opt(body, name, kind, what):
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be {what}, got {_short(value)}")
    return value


def _int(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be an integer, got {_short(value)}")
    if not low <= value <= high:
        raise ProtocolError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _num(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"{name} must be a number, got {_short(value)}")
    if value > high or value < low or (low_open and value == low):
        raise ProtocolError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ProtocolError(f"stop must be a non-empty string or a list of them, got {_short(value)}")
    if len(stops) > MAX_STOP:
        raise ProtocolError(f"stop holds at most {MAX_STOP} strings, got {len(stops)}")
    return stops


def _short(value) -> str:
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
