"""Tenant partitions of QdrantIndex in qdrant-client's real local mode (hand-made unit vectors), and the
tenant payload index it asks a server for.

What the partitions hold is read back with a plain qdrant-client on the closed index's directory: the
partitions are the index's private layout, but they are what makes a tenant's lookup cheap, so the
tests check that each point lands, and each call reaches, where the design says.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient, models

from chatmesh.vectors.values import Condition, PayloadValue, Range
from embedding_service.encoder import Vectors
from embedding_service.qdrant_index import QdrantIndex, open_qdrant_index, partition_name
from embedding_service.settings import EmbeddingSettings
from embedding_service.vector_index import PayloadKind

pytestmark = pytest.mark.integration

_T = TypeVar("_T")

DIMENSION = 8
KEYS = {"scope": PayloadKind.KEYWORD, "expires_at": PayloadKind.INTEGER, "owner": PayloadKind.KEYWORD}


def unit_vectors(count: int, seed: int = 0) -> Vectors:
    rows = np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)
    unit: Vectors = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


def ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


@pytest.fixture
def settings(tmp_path: Path) -> EmbeddingSettings:
    return EmbeddingSettings(vectors_path=tmp_path / "qdrant")


@pytest.fixture
async def index(settings: EmbeddingSettings) -> AsyncIterator[QdrantIndex]:
    async with open_qdrant_index(settings) as index:
        yield index


async def store(
    index: QdrantIndex, vectors: Vectors, payloads: list[dict[str, PayloadValue]], collection: str = "c"
) -> list[str]:
    point_ids = ids(len(vectors))
    await index.ensure_collection(collection, DIMENSION, KEYS)
    await index.upsert(collection, point_ids, vectors, payloads)
    return point_ids


async def layout(settings: EmbeddingSettings) -> dict[str, int]:
    """Points in each local collection of the (closed) index directory."""
    client = AsyncQdrantClient(path=str(settings.vectors_path))
    try:
        names = [described.name for described in (await client.get_collections()).collections]
        return {name: (await client.count(name, exact=True)).count for name in names}
    finally:
        await client.close()


async def test_each_tenant_has_a_partition_and_an_identical_text_never_crosses_tenants(
    settings: EmbeddingSettings,
) -> None:
    same = unit_vectors(1)
    async with open_qdrant_index(settings) as index:
        alice, bob, everyone = await store(
            index,
            np.repeat(same, 3, axis=0),
            [{"scope": "alice"}, {"scope": "bob"}, {"owner": "nobody"}],
        )
        for tenant, own in (("alice", alice), ("bob", bob)):
            hits = await index.search("c", same[0].tolist(), [Condition("scope", tenant)], limit=10)
            assert [(hit.id, hit.payload) for hit in hits] == [(own, {"scope": tenant})]
        everything = await index.search("c", same[0].tolist(), [], limit=10)
        assert {hit.id for hit in everything} == {alice, bob, everyone}
    assert await layout(settings) == {
        "c": 1,  # the point without a tenant
        partition_name("c", "alice"): 1,
        partition_name("c", "bob"): 1,
    }


async def test_tenant_values_of_different_types_are_different_tenants(index: QdrantIndex) -> None:
    vectors = unit_vectors(3)
    text, number, flag = await store(index, vectors, [{"scope": "1"}, {"scope": 1}, {"scope": True}])
    for tenant, own in (("1", text), (1, number), (True, flag)):
        hits = await index.search("c", vectors[0].tolist(), [Condition("scope", tenant)], limit=10)
        assert [hit.id for hit in hits] == [own]


async def test_a_search_inside_a_partition_still_checks_every_other_condition(index: QdrantIndex) -> None:
    # Within the tenant's partition the tenant condition that chose it is not checked again (every point
    # there passes it); any other condition on the tenant key still is, with Qdrant's types (1 is not True).
    vectors = unit_vectors(2)
    alice, flag = await store(index, vectors, [{"scope": "alice", "owner": "a"}, {"scope": True}])
    query = vectors[0].tolist()
    assert [h.id for h in await index.search("c", query, [Condition("scope", "alice")], 10)] == [alice]
    assert await index.search("c", query, [Condition("scope", "alice"), Condition("owner", "b")], 10) == []
    assert await index.search("c", query, [Condition("scope", "alice"), Condition("scope", "bob")], 10) == []
    assert [h.id for h in await index.search("c", query, [Condition("scope", True)], 10)] == [flag]
    assert await index.search("c", query, [Condition("scope", True), Condition("scope", 1)], 10) == []


async def test_a_call_with_a_tenant_condition_reaches_that_tenants_partition_only(
    settings: EmbeddingSettings,
) -> None:
    vectors = unit_vectors(4)
    async with open_qdrant_index(settings) as index:
        alice = await store(index, vectors[:2], [{"scope": "alice", "owner": "alice"}] * 2)
        await store(index, vectors[2:3], [{"scope": "bob", "owner": "alice"}])
    # A point of alice's outside her partition (as one stored before partitioning would be): calls
    # confined to alice never see it, calls over the whole collection do.
    misplaced = str(uuid.uuid4())
    client = AsyncQdrantClient(path=str(settings.vectors_path))
    await client.upsert(
        "c",
        [models.PointStruct(id=misplaced, vector=vectors[3].tolist(), payload={"scope": "alice"})],
    )
    await client.close()
    async with open_qdrant_index(settings) as index:
        confined = await index.search("c", vectors[3].tolist(), [Condition("scope", "alice")], limit=10)
        assert {hit.id for hit in confined} == set(alice)
        unconfined = await index.search("c", vectors[3].tolist(), [Condition("scope", Range(gte=0))], 10)
        assert unconfined == []  # a range is no tenant condition: every partition, none passes it
        assert await index.delete("c", [Condition("scope", "alice"), Condition("owner", "alice")]) == 2
        assert await index.delete("c", [Condition("owner", "alice")]) == 1  # bob's partition
    assert await layout(settings) == {"c": 1, partition_name("c", "alice"): 0, partition_name("c", "bob"): 0}


async def test_a_purge_without_tenant_condition_deletes_in_every_partition(
    settings: EmbeddingSettings,
) -> None:
    payloads: list[dict[str, PayloadValue]] = [
        {"scope": f"user-{i % 3}", "expires_at": 100 + i} for i in range(9)
    ]
    payloads.append({"expires_at": 50})  # untenanted
    # Expired: 100..104, in all three partitions, and the untenanted point.
    async with open_qdrant_index(settings) as index:
        point_ids = await store(index, unit_vectors(10), payloads)
        assert await index.delete("c", [Condition("expires_at", Range(lt=105))]) == 6
        assert await index.delete("c", [Condition("expires_at", Range(lt=105))]) == 0
        left = await index.search("c", unit_vectors(1, seed=1)[0].tolist(), [], limit=100)
        assert {hit.id for hit in left} == set(point_ids[5:9])
    assert sum((await layout(settings)).values()) == 4


async def test_a_search_without_tenant_condition_merges_the_partitions_best_first(
    index: QdrantIndex,
) -> None:
    vectors = unit_vectors(40)
    payloads: list[dict[str, PayloadValue]] = [
        {"scope": f"user-{i % 4}", "expires_at": i} if i % 5 else {"expires_at": i} for i in range(40)
    ]
    point_ids = await store(index, vectors, payloads)
    query = unit_vectors(1, seed=7)[0]
    hits = await index.search("c", query.tolist(), [Condition("expires_at", Range(gte=10))], limit=7)
    scores = vectors[10:] @ query
    best = np.argsort(-scores)[:7] + 10
    assert [hit.id for hit in hits] == [point_ids[i] for i in best]
    assert [hit.score for hit in hits] == pytest.approx(sorted(scores, reverse=True)[:7], abs=1e-5)
    threshold = float(sorted(scores, reverse=True)[2])
    above = await index.search("c", query.tolist(), [], limit=7, score_threshold=threshold - 1e-6)
    assert len(above) >= 3 and all(hit.score >= threshold - 1e-5 for hit in above)


async def test_a_point_whose_tenant_changes_leaves_its_old_partition(index: QdrantIndex) -> None:
    vector = unit_vectors(1)
    (point_id,) = await store(index, vector, [{"scope": "alice"}])
    await index.upsert("c", [point_id], vector, [{"scope": "bob"}])
    assert await index.search("c", vector[0].tolist(), [Condition("scope", "alice")], limit=5) == []
    moved = await index.search("c", vector[0].tolist(), [], limit=5)
    assert [(hit.id, hit.payload) for hit in moved] == [(point_id, {"scope": "bob"})]
    await index.upsert("c", [point_id], vector, [{"owner": "carol"}])  # to the untenanted points
    assert await index.search("c", vector[0].tolist(), [Condition("scope", "bob")], limit=5) == []
    assert [hit.payload for hit in await index.search("c", vector[0].tolist(), [], limit=5)] == [
        {"owner": "carol"}
    ]


async def test_partitions_persist_and_are_written_through_a_write_ahead_log(
    settings: EmbeddingSettings,
) -> None:
    vectors = unit_vectors(4)
    payloads: list[dict[str, PayloadValue]] = [{"scope": "alice"}, {"scope": "bob"}, {"scope": "alice"}]
    payloads.append({"scope": "bob"})
    async with open_qdrant_index(settings) as index:
        point_ids = await store(index, vectors, payloads)
    async with open_qdrant_index(settings) as index:
        hits = await index.search("c", vectors[1].tolist(), [Condition("scope", "bob")], limit=5)
        assert {hit.id for hit in hits} == {point_ids[1], point_ids[3]}
        assert hits[0].id == point_ids[1]
    for name in ("c", partition_name("c", "alice"), partition_name("c", "bob")):
        database = settings.vectors_path / "collection" / name / "storage.sqlite"
        with sqlite3.connect(database) as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        connection.close()


async def test_collections_keep_their_partitions_apart(index: QdrantIndex) -> None:
    vector = unit_vectors(1)
    await store(index, vector, [{"scope": "alice"}], collection="a")
    (other,) = await store(index, vector, [{"scope": "alice"}], collection="a-b")
    hits = await index.search("a-b", vector[0].tolist(), [Condition("scope", "alice")], limit=5)
    assert [hit.id for hit in hits] == [other]
    assert await index.delete("a", [Condition("scope", "alice")]) == 1
    assert await index.delete("a-b", [Condition("owner", Range(gte=0))]) == 0
    assert len(await index.search("a-b", vector[0].tolist(), [], limit=5)) == 1


class _OnTheCallersLoop:
    async def run(self, call: Coroutine[Any, Any, _T]) -> _T:
        return await call

    def close(self) -> None:
        pass


class _RecordingServer:
    """The part of a server client `ensure_collection` uses, recording the payload indexes asked for."""

    def __init__(self) -> None:
        self.indexes: dict[str, object] = {}

    async def collection_exists(self, name: str) -> bool:
        return False

    async def create_collection(self, name: str, vectors_config: models.VectorParams) -> bool:
        return True

    async def create_payload_index(self, name: str, key: str, field_schema: object, wait: bool) -> None:
        self.indexes[key] = field_schema


async def test_a_server_gets_one_collection_with_the_tenant_key_as_tenant_index() -> None:
    server = _RecordingServer()
    index = QdrantIndex(
        cast(AsyncQdrantClient, server),
        _OnTheCallersLoop(),
        timeout_s=5,
        tenant_key="scope",
        local_path=None,
    )
    await index.ensure_collection("c", DIMENSION, KEYS)
    assert server.indexes == {
        "scope": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
        "expires_at": models.PayloadSchemaType.INTEGER,
        "owner": models.PayloadSchemaType.KEYWORD,
    }
