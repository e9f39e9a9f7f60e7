"""Faster payload filters for qdrant-client's embedded local mode.

Local mode evaluates a search's payload filter on every point of the collection, in Python, before
it scores any vector, and for every point and every condition it parses the condition's key as a
JSON path again (`value_by_key` → `parse_json_path`, a pydantic model per path item). With the
semantic cache's five conditions that was about 40 µs per stored point on a 2-core machine: 4 ms of
a lookup for a user with 100 cached answers, 40 ms for one with 1,000, which the cache's 50 ms lookup
budget cannot afford.

`speed_up_local_filters()` swaps the `value_by_key` that local mode's filter code calls for one that
reads a plain top-level key (the only kind this service's keys can be: `[A-Za-z_][A-Za-z0-9_]*`)
with one dict lookup, and hands every other key (nested paths, arrays) to the original. The results
are the same (`tests/unit/test_local_filters.py` checks them against the original on every shape a
payload value can take); the filter costs about 2.5 times less. It is applied only to the exact
qdrant-client release it was written against (pinned in pyproject.toml); on any other, local mode
keeps its own code and a warning says so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from qdrant_client.local import payload_filters

log = logging.getLogger(__name__)

CHECKED_RELEASE = "1.20.0"
"""The qdrant-client release whose local-mode filter code the replacement was checked against."""

_REPLACED = "value_by_key"
"""The name local mode's filter code calls the key lookup by (`payload_filters.value_by_key`)."""

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

ValueByKey = Callable[..., list[Any] | None]


def plain_key_lookup(original: ValueByKey) -> ValueByKey:
    """`value_by_key(payload, key, flat=True)` that answers plain keys itself and the rest by `original`.

    The original's contract: the list of values the key selects, with a selected list unwrapped one
    level when `flat`, or None when it selects nothing (a missing key, or an empty list when `flat`).
    """
    plain: dict[str, bool] = {}

    def value_by_key(payload: dict[str, Any], key: str, flat: bool = True) -> list[Any] | None:
        is_plain = plain.get(key)
        if is_plain is None:
            is_plain = plain[key] = _PLAIN_KEY.fullmatch(key) is not None
        if not is_plain:
            return original(payload, key, flat)
        if key not in payload:
            return None
        value = payload[key]
        if flat and isinstance(value, list):
            return list(value) or None
        return [value]

    value_by_key.original = original  # type: ignore[attr-defined]
    return value_by_key


def speed_up_local_filters() -> bool:
    """Install the plain-key lookup in local mode's filter code (once); False where the installed
    qdrant-client is not the checked release and its own code stays."""
    current = getattr(payload_filters, _REPLACED)
    if hasattr(current, "original"):
        return True
    installed = version("qdrant-client")
    if installed != CHECKED_RELEASE:
        log.warning(
            "local-mode payload filters not sped up: qdrant-client %s is not the checked release %s;"
            " searches of large local collections stay slow",
            installed,
            CHECKED_RELEASE,
        )
        return False
    setattr(payload_filters, _REPLACED, plain_key_lookup(current))
    return True
