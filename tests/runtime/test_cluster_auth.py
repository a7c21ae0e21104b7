"""The cluster token file and the challenge / HMAC proofs of it."""
import os

import pytest

from e3.runtime.cluster_auth import (Challenges, ClusterAuthError, coordinator_proof, join_proof, proof_matches,
                                     read_token)
from e3.runtime.errors import ConfigError

TOKEN = "a" * 32


def token_file(tmp_path, text=TOKEN, mode=0o600):
    path = tmp_path / "token"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_an_owner_only_token_file_is_read_stripped(tmp_path):
    assert read_token(token_file(tmp_path, TOKEN + "\n")) == TOKEN.encode()


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: token_file(p, ""), "is empty"),
    (lambda p: token_file(p, "  \n"), "is empty"),
    (lambda p: token_file(p, "short"), "has 5 characters; use 16 or more"),
    (lambda p: token_file(p, mode=0o644), "is open to other users (mode 0644); make it owner-only: chmod 600"),
    (lambda p: token_file(p, mode=0o640), "is open to other users (mode 0640)"),
    (lambda p: str(p), "is not a regular file"),
])
def test_a_bad_token_file_is_a_config_error_naming_it(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ConfigError, match="cluster token") as info:
        read_token(path)
    assert message in str(info.value) and repr(path) in str(info.value)


def test_proofs_bind_the_token_the_challenge_and_the_host():
    c = Challenges(30.0)
    nonce = c.issue()
    good = join_proof(TOKEN.encode(), nonce, "127.0.0.2")
    assert proof_matches(good, join_proof(TOKEN.encode(), nonce, "127.0.0.2"))
    assert not proof_matches(good, join_proof(b"b" * 32, nonce, "127.0.0.2"))
    assert not proof_matches(good, join_proof(TOKEN.encode(), c.issue(), "127.0.0.2"))
    assert not proof_matches(good, join_proof(TOKEN.encode(), nonce, "127.0.0.3"))
    assert not proof_matches(good, None)
    assert coordinator_proof(TOKEN.encode(), "n1") != coordinator_proof(TOKEN.encode(), "n2")
    assert TOKEN not in good and TOKEN.encode().hex() not in good


def test_a_challenge_is_ours_fresh_and_good_once():
    now = [1000.0]
    c = Challenges(30.0, clock=lambda: now[0])
    nonce = c.issue()
    c.check(nonce)
    c.check(nonce)                      # checking allocates nothing; only a used one is refused
    c.consume(nonce)
    with pytest.raises(ClusterAuthError, match="used already"):
        c.check(nonce)
    other = Challenges(30.0, clock=lambda: now[0]).issue()
    with pytest.raises(ClusterAuthError, match="not issued by this coordinator"):
        c.check(other)
    stale = c.issue()
    now[0] += 31
    with pytest.raises(ClusterAuthError, match="expired"):
        c.check(stale)
    for bad in (None, "", "zz", "00" * 8):
        with pytest.raises(ClusterAuthError, match="no valid challenge"):
            c.check(bad)


def test_used_challenges_are_remembered_within_a_bound():
    c = Challenges(30.0, remember=4)
    nonces = [c.issue() for _ in range(6)]
    for n in nonces:
        c.consume(n)
    assert len(c._used) == 4
    with pytest.raises(ClusterAuthError, match="used already"):
        c.check(nonces[-1])
