"""The cluster's shared secret and how a peer proves it knows it.

A cluster shares one token, read from an owner-only file on every node
(`read_token`). Nothing carries the token itself: a member asks the
coordinator for a challenge (`Challenges.issue`) and answers with an HMAC of
it (`join_proof`), checked in constant time (`hmac.compare_digest`). The
coordinator answers the member's own nonce the same way (`coordinator_proof`),
so a member also knows it reached a coordinator holding the token.

Challenges are stateless until used: a nonce is a timestamp, random bytes and
an HMAC of both under a key only this coordinator process holds, so issuing
one allocates nothing and a forged or expired one is refused. A nonce is
remembered once it was used (a bounded set), so a captured answer cannot be
replayed while its challenge is still fresh.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import os
import stat
import struct
import time
from pathlib import Path
from typing import Callable

from .errors import ConfigError, RuntimeError_

MIN_TOKEN_CHARS = 16
_STAMP = struct.Struct(">Q")
_RAND, _MAC = 16, 16


class ClusterAuthError(RuntimeError_):
    """Raised when a peer's proof of the cluster token is missing (401) or wrong (403)."""

    status = 403


def read_token(path: str) -> bytes:
    """The token in `path`, stripped; ConfigError naming the file when it is missing, empty,
    too short, or readable or writable by anyone but its owner."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"cluster token file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cluster token file {path!r} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"cluster token file {path!r} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"cluster token file {path!r} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"make it owner-only: chmod 600 {path}")
    try:
        token = p.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cluster token file {path!r} cannot be read: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"cluster token file {path!r} is empty")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"cluster token in {path!r} has {len(token)} characters; use {MIN_TOKEN_CHARS} or more "
                          "(e.g. python3 -c 'import secrets; print(secrets.token_hex(32))')")
    return token


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\0".join(parts), hashlib.sha256).digest()


def join_proof(token: bytes, nonce: str, member_host: str) -> str:
    """What a member sends to join: an HMAC of the coordinator's challenge and its own address."""
    return _mac(token, b"e3-join", nonce.encode(), member_host.encode()).hex()


def coordinator_proof(token: bytes, member_nonce: str) -> str:
    """What the coordinator sends back: an HMAC of the member's nonce."""
    return _mac(token, b"e3-coordinator", member_nonce.encode()).hex()


def proof_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of two hex proofs (a missing one never matches)."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def new_nonce() -> str:
    return os.urandom(_RAND).hex()


class Challenges:
    """The coordinator's challenges: issued without state, checked once each."""

    def __init__(self, ttl_s: float, *, remember: int = 4096, clock: Callable[[], float] = time.time):
        self.ttl_s, self._clock = ttl_s, clock
        self._key = os.urandom(32)           # this process's alone: a restart voids old challenges
        self._used: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = remember

    def issue(self) -> str:
        head = _STAMP.pack(int(self._clock() * 1000)) + os.urandom(_RAND)
        return (head + _mac(self._key, head)[:_MAC]).hex()

    def check(self, nonce: str | None) -> None:
        """Raise ClusterAuthError unless `nonce` is one of ours, fresh and unused."""
        try:
            raw = bytes.fromhex(nonce or "")
        except ValueError:
            raw = b""
        if len(raw) != _STAMP.size + _RAND + _MAC:
            raise ClusterAuthError("the join carries no valid challenge (POST /e3/cluster/challenge first)")
        head, mac = raw[:-_MAC], raw[-_MAC:]
        if not hmac.compare_digest(_mac(self._key, head)[:_MAC], mac):
            raise ClusterAuthError("the challenge was not issued by this coordinator")
        (stamp_ms,) = _STAMP.unpack(head[:_STAMP.size])
        age = self._clock() - stamp_ms / 1000
        if not -1.0 <= age <= self.ttl_s:
            raise ClusterAuthError(f"the challenge expired ({age:.0f} s old; good for {self.ttl_s:.0f} s)")
        if nonce in self._used:
            raise ClusterAuthError("the challenge was used already")

    def consume(self, nonce: str) -> None:
        """Mark a checked challenge used (after its proof matched: a refusal allocates nothing)."""
        self._used[nonce] = None
        while len(self._used) > self._remember:
            self._used.popitem(last=False)
