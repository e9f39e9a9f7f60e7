"""The vector service remembers recent texts' vectors instead of embedding them again."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedding_service.batcher import MicroBatcher
from embedding_service.encoder import Vectors
from embedding_service.vector_servicer import RecentEmbeddings


class CountingBatcher:
    """Stands in for the micro-batcher: a vector per text derived from its length, and a call log."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


async def test_a_text_seen_before_is_not_embedded_again() -> None:
    batcher = CountingBatcher()
    recent = RecentEmbeddings(capacity=3)
    fake: MicroBatcher = batcher  # type: ignore[assignment]
    first = await recent.embed(fake, ["a", "bb", "a"])
    assert batcher.calls == [["a", "bb"]], "one batch, each text once"
    assert [v[0] for v in first] == [1, 2, 1]
    again = await recent.embed(fake, ["bb", "ccc"])
    assert batcher.calls[-1] == ["ccc"] and [v[0] for v in again] == [2, 3]


async def test_the_least_recently_used_text_is_forgotten_first() -> None:
    batcher = CountingBatcher()
    recent = RecentEmbeddings(capacity=2)
    fake: MicroBatcher = batcher  # type: ignore[assignment]
    await recent.embed(fake, ["a", "b"])
    await recent.embed(fake, ["a"])  # b is now the least recently used
    await recent.embed(fake, ["c"])
    await recent.embed(fake, ["a", "b"])
    assert batcher.calls == [["a", "b"], ["c"], ["b"]]


async def test_a_call_larger_than_the_capacity_still_gets_every_vector() -> None:
    recent = RecentEmbeddings(capacity=1)
    fake: MicroBatcher = CountingBatcher()  # type: ignore[assignment]
    vectors = await recent.embed(fake, ["a", "bb", "ccc"])
    assert [v[0] for v in vectors] == [1, 2, 3]
