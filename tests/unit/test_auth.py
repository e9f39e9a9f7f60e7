"""JWT verification and bearer-token parsing: every failure is Unauthenticated and says why."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatmesh.common.auth import JwtKeys, bearer_token, issue_token, verify_token
from chatmesh.common.errors import Unauthenticated

SECRET = "s" * 40
KEYS = JwtKeys.hs256(SECRET)


def test_round_trip_gives_the_subject() -> None:
    assert verify_token(KEYS, issue_token(KEYS, "alice")) == "alice"


def expiring_in(seconds: float) -> int:
    """An `exp` claim `seconds` from now. Called inside tests, never at import: a token made when the
    module is imported would expire while a long suite runs, and the test would fail for that reason."""
    return int(time.time() + seconds)


@pytest.mark.parametrize(
    ("claims", "exp_in_s", "reason"),
    [
        ({"sub": "alice"}, -3600, "expired"),
        ({}, 60, "sub"),
        ({"sub": "alice"}, None, "exp"),
        ({"sub": ""}, 60, "sub"),
        ({"sub": "al\u0000ice"}, 60, "control characters"),
        ({"sub": "alice\nINFO forged log line"}, 60, "control characters"),
    ],
    ids=["expired", "no-sub", "no-exp", "empty-sub", "nul-in-sub", "newline-in-sub"],
)
def test_bad_claims_are_unauthenticated(claims: dict[str, object], exp_in_s: int | None, reason: str) -> None:
    if exp_in_s is not None:
        claims = {**claims, "exp": expiring_in(exp_in_s)}
    with pytest.raises(Unauthenticated, match=reason):
        verify_token(KEYS, jwt.encode(claims, SECRET, algorithm="HS256"))


def test_wrong_secret_and_wrong_algorithm_are_rejected() -> None:
    forged = jwt.encode({"sub": "alice", "exp": expiring_in(60)}, "x" * 40, algorithm="HS256")
    with pytest.raises(Unauthenticated):
        verify_token(KEYS, forged)
    unsigned = jwt.encode({"sub": "alice", "exp": expiring_in(60)}, "", algorithm="none")
    with pytest.raises(Unauthenticated):
        verify_token(KEYS, unsigned)


def test_rs256_verifies_with_the_public_key_only() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    token = issue_token(JwtKeys.rs256(public_pem, private_pem), "bob")
    assert verify_token(JwtKeys.rs256(public_pem), token) == "bob"
    with pytest.raises(Unauthenticated):
        verify_token(KEYS, token)  # an RS256 token is not accepted where HS256 is configured


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        JwtKeys.hs256("short")


@pytest.mark.parametrize(
    ("metadata", "result"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("x-other", "1"), ("authorization", b"Bearer xyz")), "xyz"),
    ],
)
def test_bearer_token_is_read_from_metadata(
    metadata: tuple[tuple[str, str | bytes], ...], result: str
) -> None:
    assert bearer_token(metadata) == result


@pytest.mark.parametrize("metadata", [(), (("authorization", "Basic abc"),), (("authorization", "Bearer "),)])
def test_missing_or_malformed_authorization_is_unauthenticated(metadata: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(Unauthenticated):
        bearer_token(metadata)
