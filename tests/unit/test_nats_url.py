"""`redacted_url`: what of a NATS URL may be logged (the server, never its credentials)."""

from __future__ import annotations

import pytest

from chat_service.jobs.queue import redacted_url


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://user:pass@nats.internal:4222", "nats://***@nats.internal:4222"),
        ("tls://s3cr3t-token@nats.internal", "tls://***@nats.internal"),
        (
            "nats://u:p@a:4222,nats://b:4222,nats://t@c:4222",
            "nats://***@a:4222,nats://b:4222,nats://***@c:4222",
        ),
        ("user:p@ss@host:4222", "***@host:4222"),
        ("nats://host:4222/path@not-credentials", "nats://host:4222/path@not-credentials"),
    ],
)
def test_credentials_never_reach_the_log(url: str, logged: str) -> None:
    assert redacted_url(url) == logged
