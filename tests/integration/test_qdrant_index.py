"""QdrantIndex on qdrant-client's real local mode (no model: hand-made unit vectors), and its error
mapping against a server address where nothing answers properly."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from chatmesh.common.errors import InvalidArgument, Unavailable
from chatmesh.vectors.values import Condition, Range
from embedding_service.encoder import Vectors
from embedding_service.qdrant_index import QdrantIndex, open_qdrant_index
from embedding_service.settings import EmbeddingSettings
from embedding_service.vector_index import PayloadKind
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

DIMENSION = 8


def unit_vectors(count: int, seed: int = 0) -> Vectors:
    rows = np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)
    unit: Vectors = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


def ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[QdrantIndex]:
    async with open_qdrant_index(EmbeddingSettings(vectors_path=tmp_path / "qdrant")) as index:
        yield index


async def fill(index: QdrantIndex, collection: str, vectors: Vectors, users: list[str]) -> list[str]:
    point_ids = ids(len(vectors))
    await index.ensure_collection(collection, DIMENSION, {"user": PayloadKind.KEYWORD})
    await index.upsert(collection, point_ids, vectors, [{"user": user} for user in users])
    return point_ids


async def test_search_ranks_by_cosine_within_the_filter(index: QdrantIndex) -> None:
    vectors = unit_vectors(6)
    point_ids = await fill(index, "c", vectors, ["a", "b"] * 3)
    hits = await index.search("c", vectors[2].tolist(), [Condition("user", "a")], limit=10)
    assert hits[0].id == point_ids[2] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert {hit.id for hit in hits} == {point_ids[0], point_ids[2], point_ids[4]}
    expected = sorted((float(vectors[i] @ vectors[2]) for i in (0, 2, 4)), reverse=True)
    assert [hit.score for hit in hits] == pytest.approx(expected, abs=1e-5)
    assert all(hit.payload == {"user": "a"} for hit in hits)


async def test_a_missing_collection_is_empty(index: QdrantIndex) -> None:
    assert await index.search("nothing-here", unit_vectors(1)[0].tolist(), [], limit=5) == []
    assert await index.delete("nothing-here", [Condition("user", "a")]) == 0


async def test_delete_counts_what_it_removed(index: QdrantIndex) -> None:
    await fill(index, "c", unit_vectors(5), ["a", "a", "a", "b", "b"])
    assert await index.delete("c", [Condition("user", "a")]) == 3
    assert await index.delete("c", [Condition("user", "a")]) == 0
    left = await index.search("c", unit_vectors(1, seed=1)[0].tolist(), [], limit=10)
    assert len(left) == 2
    with pytest.raises(InvalidArgument, match="every point"):
        await index.delete("c", [])


async def test_another_dimension_is_refused(index: QdrantIndex) -> None:
    await fill(index, "c", unit_vectors(1), ["a"])
    with pytest.raises(InvalidArgument) as info:
        await index.ensure_collection("c", DIMENSION * 2, {})
    assert info.value.field == "collection" and "8-dimensional" in info.value.problem
    with pytest.raises(InvalidArgument):
        await index.search("c", [1.0] + [0.0] * (DIMENSION * 2 - 1), [], limit=1)


async def test_concurrent_first_upserts_create_the_collection_once(index: QdrantIndex) -> None:
    vectors = unit_vectors(8)
    await asyncio.gather(*(fill(index, "fresh", vectors[i : i + 1], ["a"]) for i in range(8)))
    assert len(await index.search("fresh", vectors[0].tolist(), [], limit=100)) == 8


async def test_points_persist_and_the_directory_is_locked_while_open(tmp_path: Path) -> None:
    settings = EmbeddingSettings(vectors_path=tmp_path / "qdrant")
    vectors = unit_vectors(3)
    async with open_qdrant_index(settings) as index:
        point_ids = await fill(index, "c", vectors, ["a", "b", "c"])
        with pytest.raises(RuntimeError, match="in use by another process"):
            async with open_qdrant_index(settings):
                pass
    async with open_qdrant_index(settings) as index:
        hits = await index.search("c", vectors[1].tolist(), [Condition("user", "b")], limit=5)
    assert [(hit.id, hit.payload) for hit in hits] == [(point_ids[1], {"user": "b"})]


async def test_a_long_local_search_leaves_the_event_loop_free(index: QdrantIndex) -> None:
    # Local mode evaluates the filter point by point in Python; on the service's loop no other task
    # could run until it finished. On the index's own thread, others keep running meanwhile.
    count = 5000
    users = [f"user-{i % 100}" for i in range(count)]
    point_ids = ids(count)
    vectors = unit_vectors(count)
    await index.ensure_collection("big", DIMENSION, {"user": PayloadKind.KEYWORD})
    for start in range(0, count, 500):
        end = start + 500
        await index.upsert(
            "big", point_ids[start:end], vectors[start:end], [{"user": u} for u in users[start:end]]
        )
    ticks = 0
    search = asyncio.ensure_future(
        index.search(
            "big", vectors[7].tolist(), [Condition("user", "user-7"), Condition("n", Range(gte=0))], 5
        )
    )
    while not search.done():
        ticks += 1
        await asyncio.sleep(0)
    assert await search == []  # no point has `n`: every one fails the filter
    assert ticks > 1, "the event loop was blocked for the whole search"


async def test_an_unreachable_server_is_unavailable_with_the_cause() -> None:
    settings = EmbeddingSettings(vectors_url=f"http://127.0.0.1:{free_port()}", vectors_timeout_s=10)
    async with open_qdrant_index(settings) as index:
        with pytest.raises(Unavailable, match="unavailable") as info:
            await index.search("c", unit_vectors(1)[0].tolist(), [], limit=1)
    assert info.value.__cause__ is not None


async def test_a_server_that_never_answers_is_unavailable_after_the_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = EmbeddingSettings(vectors_url=f"http://127.0.0.1:{port}", vectors_timeout_s=0.2)
    try:
        async with open_qdrant_index(settings) as index:
            with pytest.raises(Unavailable, match="did not finish") as info:
                await index.search("c", unit_vectors(1)[0].tolist(), [], limit=1)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert accepted, "the request never reached the server"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
