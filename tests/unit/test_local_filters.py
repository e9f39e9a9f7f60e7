"""The plain-key lookup that speeds up qdrant-client's local-mode filters gives the original's answers."""

from __future__ import annotations

from typing import Any

import pytest
from qdrant_client.local import payload_filters
from qdrant_client.local.payload_value_extractor import value_by_key as original

from embedding_service.local_filters import plain_key_lookup, speed_up_local_filters

PAYLOADS: list[dict[str, Any]] = [
    {},
    {"scope": "alice", "expires_at": 1.5, "token_count": 3, "flag": True},
    {"scope": None},
    {"scope": []},
    {"scope": ["a", "b"]},
    {"scope": [["a"], "b"]},
    {"scope": {"nested": 1}},
    {"scope": 0},
    {"scope": ""},
    {"a": {"b": [1, {"c": 2}]}, "list": [{"x": 1}, {"x": 2}]},
]
KEYS = ["scope", "expires_at", "flag", "missing", "_x1", "a.b", "list[].x", "list[0].x", "a.b[1].c"]


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("key", KEYS)
def test_every_key_and_payload_shape_gives_the_originals_values(key: str, flat: bool) -> None:
    fast = plain_key_lookup(original)
    for payload in PAYLOADS:
        assert fast(payload, key, flat) == original(payload, key, flat), (payload, key, flat)


def test_installed_once_in_the_filter_code_that_local_mode_calls() -> None:
    assert speed_up_local_filters()
    installed = vars(payload_filters)["value_by_key"]
    assert getattr(installed, "original", None) is original
    assert speed_up_local_filters()
    assert vars(payload_filters)["value_by_key"] is installed  # not wrapped twice
