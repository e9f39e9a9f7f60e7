"""The vector service over gRPC: the real embedding model, qdrant-client's local mode, GrpcVectorClient.

Most tests share the session's embedding service (tests/conftest.py) and keep apart by writing to a
collection of their own; the restart and lock tests start private services on their own directories.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chatmesh.common.errors import InvalidArgument
from chatmesh.vectors.client import GrpcVectorClient, NewPoint
from chatmesh.vectors.v1 import vectors_pb2 as pb
from chatmesh.vectors.v1 import vectors_pb2_grpc
from chatmesh.vectors.values import Range
from tests.support.processes import LoggedProcess, free_port, run_service, start_process, stop_process
from tests.support.services import MODEL_STARTUP_TIMEOUT_S
from tests.support.stack import embedding_env

pytestmark = pytest.mark.integration

SERVICE = "chatmesh.vectors.v1.VectorService"
PAIRS_FILE = Path(__file__).resolve().parents[1] / "data" / "qqp_pairs_sample.json"


def new_collection() -> str:
    """A collection no other test writes to."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def channel(embedding_service: tuple[str, LoggedProcess]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(embedding_service[0]) as channel:
        yield channel


@pytest.fixture
def client(channel: grpc.aio.Channel) -> GrpcVectorClient:
    # Generous deadlines: the shared service may be busy embedding for another module's test.
    return GrpcVectorClient(channel, search_timeout_s=60, write_timeout_s=60)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> vectors_pb2_grpc.VectorServiceStub:
    return vectors_pb2_grpc.VectorServiceStub(channel)


async def test_health_and_reflection_list_the_vector_service(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    services = [s.name async for response in call for s in response.list_services_response.service]
    assert SERVICE in services


async def test_a_paraphrase_finds_the_stored_question(client: GrpcVectorClient) -> None:
    collection = new_collection()
    pairs = json.loads(PAIRS_FILE.read_text())[:40]
    ids = [uuid.uuid4() for _ in pairs]
    stored = await client.upsert(
        collection,
        [
            NewPoint(point_id, pair["origin"], {"user_id": "alice", "answer": f"answer {i}"})
            for i, (point_id, pair) in enumerate(zip(ids, pairs, strict=True))
        ],
    )
    assert stored == len(pairs)
    question = "How do I reset my password?"
    password = uuid.uuid4()
    await client.upsert(collection, [NewPoint(password, question, {"user_id": "alice", "answer": "reset"})])

    hits = await client.search(
        collection, "I forgot my password, how can I change it?", where={"user_id": "alice"}, limit=3
    )
    assert hits[0].id == str(password)
    assert hits[0].payload == {"user_id": "alice", "answer": "reset"}
    assert hits[0].score > 0.6, hits
    assert hits[0].score > hits[1].score + 0.2, hits  # far ahead of the unrelated questions
    # The identical text scores (up to float rounding) 1.
    exact = await client.search(collection, question, limit=1)
    assert exact[0].id == str(password) and exact[0].score == pytest.approx(1.0, abs=1e-4)
    # A threshold above every score returns nothing: a cache miss, not an error.
    assert await client.search(collection, "I forgot my password", score_threshold=0.99) == []


async def test_filters_are_hard_even_for_an_identical_text(client: GrpcVectorClient) -> None:
    collection = new_collection()
    text = "What is the capital of France?"
    alice, bob = uuid.uuid4(), uuid.uuid4()
    await client.upsert(
        collection,
        [
            NewPoint(alice, text, {"user_id": "alice", "model": "gemma"}),
            NewPoint(bob, "Which city is the capital of France?", {"user_id": "bob", "model": "gemma"}),
        ],
    )
    bobs = await client.search(collection, text, where={"user_id": "bob"}, limit=100)
    assert [hit.id for hit in bobs] == [str(bob)]
    assert await client.search(collection, text, where={"user_id": "carol"}, limit=100) == []
    # Every condition must hold.
    assert await client.search(collection, text, where={"user_id": "alice", "model": "other"}) == []
    both = await client.search(collection, text, where={"model": "gemma"}, limit=100)
    assert [hit.id for hit in both] == [str(alice), str(bob)]


async def test_a_range_filter_excludes_expired_points(client: GrpcVectorClient) -> None:
    collection = new_collection()
    now = int(time.time())
    fresh, stale = uuid.uuid4(), uuid.uuid4()
    await client.upsert(
        collection,
        [
            NewPoint(stale, "How tall is the Eiffel tower?", {"user_id": "alice", "expires_at": now - 60}),
            NewPoint(
                fresh,
                "What is the height of the Eiffel tower?",
                {"user_id": "alice", "expires_at": now + 3600},
            ),
        ],
    )
    query = "How tall is the Eiffel tower?"
    hits = await client.search(collection, query, where={"user_id": "alice", "expires_at": Range(gt=now)})
    assert [hit.id for hit in hits] == [str(fresh)]
    everything = await client.search(collection, query, where={"user_id": "alice"})
    assert [hit.id for hit in everything] == [str(stale), str(fresh)]
    # Bounds on both sides.
    window = await client.search(collection, query, where={"expires_at": Range(gte=now - 60, lt=now)})
    assert [hit.id for hit in window] == [str(stale)]


async def test_delete_by_filter_removes_exactly_the_matching_points(client: GrpcVectorClient) -> None:
    collection = new_collection()
    chat_a, chat_b = "chat-a", "chat-b"
    questions = ["How do plants grow?", "Why is the sky blue?", "What is gravity?"]
    points = [NewPoint(uuid.uuid4(), q, {"user_id": "alice", "chat_id": chat_a}) for q in questions]
    keep = [NewPoint(uuid.uuid4(), q, {"user_id": "alice", "chat_id": chat_b}) for q in questions[:2]]
    await client.upsert(collection, [*points, *keep])

    assert await client.delete(collection, {"chat_id": chat_a}) == 3
    left = await client.search(collection, "Why is the sky blue?", where={"user_id": "alice"}, limit=100)
    assert sorted(hit.id for hit in left) == sorted(str(point.id) for point in keep)
    assert await client.delete(collection, {"chat_id": chat_a}) == 0
    assert await client.delete(new_collection(), {"chat_id": chat_a}) == 0  # no such collection: nothing


async def test_cache_entries_are_kept_apart_by_scope_and_purged_across_scopes(
    client: GrpcVectorClient,
) -> None:
    # The semantic cache's shape: `scope` is the service's default tenant key, so in local mode every
    # scope is a partition of its own; the purge names no scope and must reach all of them.
    collection = new_collection()
    now = int(time.time())
    question = "How many moons does Jupiter have?"
    entries = {
        scope: NewPoint(uuid.uuid4(), question, {"scope": scope, "owner": scope, "expires_at": expires})
        for scope, expires in (("alice", now + 3600), ("bob", now - 60), ("*", now - 60))
    }
    await client.upsert(collection, list(entries.values()))
    for scope, entry in entries.items():
        hits = await client.search(collection, question, where={"scope": scope}, limit=10)
        assert [hit.id for hit in hits] == [str(entry.id)]
    fresh = await client.search(collection, question, where={"expires_at": Range(gt=now)}, limit=10)
    assert [hit.id for hit in fresh] == [str(entries["alice"].id)]
    assert await client.delete(collection, {"expires_at": Range(lt=now)}) == 2
    assert await client.search(collection, question, where={"scope": "bob"}) == []
    assert await client.delete(collection, {"owner": "alice"}) == 1
    assert await client.search(collection, question, limit=10) == []


async def test_an_empty_delete_filter_is_refused_and_deletes_nothing(
    client: GrpcVectorClient, stub: vectors_pb2_grpc.VectorServiceStub
) -> None:
    collection = new_collection()
    point = NewPoint(uuid.uuid4(), "Is this still here?", {"user_id": "alice"})
    await client.upsert(collection, [point])
    with pytest.raises(InvalidArgument) as info:
        await client.delete(collection, {})
    assert info.value.field == "filter"
    assert "every point" in info.value.problem
    assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await stub.Delete(pb.DeleteRequest(collection=collection), timeout=30)  # no filter at all
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [hit.id for hit in await client.search(collection, point.text)] == [str(point.id)]


async def test_upserting_an_id_again_replaces_the_point(client: GrpcVectorClient) -> None:
    collection = new_collection()
    point_id = uuid.uuid4()
    await client.upsert(collection, [NewPoint(point_id, "What is the boiling point of water?", {"v": 1})])
    await client.upsert(
        collection, [NewPoint(point_id, "Who wrote Hamlet?", {"v": 2, "ratio": 0.5, "ok": True})]
    )
    hits = await client.search(collection, "Who is the author of Hamlet?", limit=10)
    assert [(hit.id, hit.payload) for hit in hits] == [(str(point_id), {"v": 2, "ratio": 0.5, "ok": True})]
    assert await client.search(collection, "x", where={"ok": False}) == []
    assert len(await client.search(collection, "x", where={"ok": True, "v": 2})) == 1


async def test_searching_a_collection_that_does_not_exist_finds_nothing(client: GrpcVectorClient) -> None:
    assert await client.search(new_collection(), "Anything at all?", where={"user_id": "alice"}) == []


def valid_point(
    point_id: str | None = None, text: str = "a question", payload: dict[str, pb.Value] | None = None
) -> pb.Point:
    """A point that is valid except for what is given."""
    return pb.Point(
        id=point_id or str(uuid.uuid4()),
        text=text,
        payload={"user_id": pb.Value(text_value="a")} if payload is None else payload,
    )


BAD_REQUESTS: list[tuple[str, pb.SearchRequest | pb.UpsertRequest | pb.DeleteRequest, str, str]] = [
    ("limit-too-big", pb.SearchRequest(collection="c", text="q", limit=101), "limit", "1 to 100"),
    ("limit-negative", pb.SearchRequest(collection="c", text="q", limit=-1), "limit", "1 to 100"),
    ("no-collection", pb.SearchRequest(text="q"), "collection", "not a collection name"),
    ("bad-collection", pb.SearchRequest(collection="a/b", text="q"), "collection", "not a collection name"),
    ("blank-text", pb.SearchRequest(collection="c", text="  "), "text", "empty"),
    ("text-too-long", pb.SearchRequest(collection="c", text="x" * 8193), "text", "8193 characters"),
    (
        "threshold",
        pb.SearchRequest(collection="c", text="q", score_threshold=1.5),
        "score_threshold",
        "between",
    ),
    (
        "condition-without-match",
        pb.SearchRequest(collection="c", text="q", filter=pb.Filter(must=[pb.Condition(key="k")])),
        "filter.must[0]",
        "no match",
    ),
    (
        "bad-key",
        pb.SearchRequest(
            collection="c",
            text="q",
            filter=pb.Filter(
                must=[pb.Condition(key="a", equals_int=1), pb.Condition(key="a.b", equals_int=1)]
            ),
        ),
        "filter.must[1].key",
        "not a payload key",
    ),
    (
        "empty-range",
        pb.DeleteRequest(collection="c", filter=pb.Filter(must=[pb.Condition(key="t", range=pb.Range())])),
        "filter.must[0].range",
        "no bound",
    ),
    ("no-points", pb.UpsertRequest(collection="c"), "points", "at least one"),
    (
        "too-many-points",
        pb.UpsertRequest(collection="c", points=[valid_point() for _ in range(65)]),
        "points",
        "at most 64",
    ),
    (
        "not-a-uuid",
        pb.UpsertRequest(collection="c", points=[valid_point("42")]),
        "points[0].id",
        "not a UUID",
    ),
    (
        "duplicate-id",
        pb.UpsertRequest(
            collection="c",
            points=[
                valid_point("6a1c1a7e-0000-4000-8000-000000000001"),
                valid_point("6A1C1A7E-0000-4000-8000-000000000001"),
            ],
        ),
        "points[1].id",
        "twice",
    ),
    (
        "blank-point-text",
        pb.UpsertRequest(collection="c", points=[valid_point(), valid_point(text="")]),
        "points[1].text",
        "empty",
    ),
    (
        "value-without-kind",
        pb.UpsertRequest(collection="c", points=[valid_point(payload={"k": pb.Value()})]),
        'points[0].payload["k"]',
        "no value",
    ),
    (
        "bad-payload-key",
        pb.UpsertRequest(collection="c", points=[valid_point(payload={"1st": pb.Value(int_value=1)})]),
        "points[0].payload",
        "not a payload key",
    ),
]


@pytest.mark.parametrize(
    ("request_", "field", "problem"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_requests_are_invalid_argument_naming_the_field(
    stub: vectors_pb2_grpc.VectorServiceStub,
    request_: pb.SearchRequest | pb.UpsertRequest | pb.DeleteRequest,
    field: str,
    problem: str,
) -> None:
    method = {pb.SearchRequest: stub.Search, pb.UpsertRequest: stub.Upsert, pb.DeleteRequest: stub.Delete}[
        type(request_)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith(f"{field}: "), details
    assert problem in details, details


async def test_the_index_survives_a_restart_and_is_locked_while_open(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    path = tmp_path / "qdrant"
    point = NewPoint(
        uuid.uuid4(), "Where do penguins live?", {"user_id": "alice", "expires_at": 2_000_000_000}
    )
    with run_service(
        "embedding_service", embedding_env(address, path), address, MODEL_STARTUP_TIMEOUT_S
    ) as first:
        async with grpc.aio.insecure_channel(address) as channel:
            client = GrpcVectorClient(channel, search_timeout_s=60, write_timeout_s=60)
            await client.upsert("persist", [point])
        # A second service on the same directory is refused at once, saying why (before loading a model).
        second_address = f"127.0.0.1:{free_port()}"
        second = start_process(
            [sys.executable, "-m", "embedding_service"], embedding_env(second_address, path)
        )
        try:
            returncode = await asyncio.to_thread(second.wait, MODEL_STARTUP_TIMEOUT_S)
            assert returncode != 0
            assert "in use by another process" in second.output(), second.output_tail()
        finally:
            stop_process(second)
            second.remove_log()
    assert first.returncode == 0, "SIGTERM should close the index and exit cleanly"

    with run_service("embedding_service", embedding_env(address, path), address, MODEL_STARTUP_TIMEOUT_S):
        async with grpc.aio.insecure_channel(address) as channel:
            client = GrpcVectorClient(channel, search_timeout_s=60, write_timeout_s=60)
            hits = await client.search(
                "persist", "In which places do penguins live?", where={"user_id": "alice"}
            )
    assert [(hit.id, hit.payload) for hit in hits] == [(str(point.id), dict(point.payload))]
