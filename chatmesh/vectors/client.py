"""Client of the vector service (chatmesh.vectors.v1.VectorService), for the semantic cache and other
callers that store and find texts by meaning.

    from chatmesh.vectors.client import GrpcVectorClient, NewPoint
    from chatmesh.vectors.values import Range

    client = GrpcVectorClient(grpc.aio.insecure_channel("127.0.0.1:50053"))
    point = NewPoint(uuid4(), "How old is Paris?", {"user_id": "alice", "expires_at": now + 3600})
    await client.upsert("cache", [point])
    hits = await client.search(
        "cache", "What is the age of Paris?", where={"user_id": "alice", "expires_at": Range(gt=now)}, limit=1
    )

Payloads are plain dicts of `str`, `int`, `float` and `bool`; a filter is a dict of key -> exact value
(`str`, `int`, `bool`) or `Range`, all of which must hold. Failures are the domain errors of
`chatmesh.common.errors` (`InvalidArgument` with `.field`, `Unavailable`, `DeadlineExceeded`, ...), with
the `grpc.aio.AioRpcError` as the cause.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from chatmesh.common.errors import rpc_errors
from chatmesh.common.tracing import NO_CALL_TRACING, ClientCalls
from chatmesh.vectors.v1 import vectors_pb2 as pb
from chatmesh.vectors.v1 import vectors_pb2_grpc
from chatmesh.vectors.values import (
    Match,
    Payload,
    PayloadValue,
    conditions,
    filter_to_pb,
    payload_from_pb,
    payload_to_pb,
)

_SERVICE = "vector service"
_SERVICE_PATH = f"/{pb.DESCRIPTOR.services_by_name['VectorService'].full_name}"
_SEARCH = f"{_SERVICE_PATH}/Search"
_UPSERT = f"{_SERVICE_PATH}/Upsert"
_DELETE = f"{_SERVICE_PATH}/Delete"

Where = Mapping[str, Match]
"""A filter: `{"user_id": "alice", "expires_at": Range(gt=now)}`, every condition must hold."""


@dataclass(frozen=True, slots=True)
class NewPoint:
    """A text to store under `id`, with its payload."""

    id: uuid.UUID | str
    text: str
    payload: Payload = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hit:
    """A stored point found by a search."""

    id: str
    score: float
    """Cosine similarity between the query and the point's text (1: same meaning)."""
    payload: dict[str, PayloadValue]


class VectorClient(Protocol):
    """What a caller needs from the vector service (a fake stands in for it in unit tests)."""

    async def search(
        self,
        collection: str,
        text: str,
        *,
        where: Where | None = None,
        limit: int = 5,
        score_threshold: float | None = None,
    ) -> list[Hit]:
        """The points most similar to `text` that pass `where`, best first (none if the collection does
        not exist yet)."""
        ...

    async def upsert(self, collection: str, points: Sequence[NewPoint]) -> int:
        """Store `points` (replacing points with the same ids); returns how many were stored."""
        ...

    async def delete(self, collection: str, where: Where) -> int:
        """Delete the points that pass `where` (at least one condition); returns how many matched."""
        ...


class GrpcVectorClient:
    """`VectorClient` over a gRPC channel to the embedding service.

    Deadlines: `search_timeout_s` for a search (a cache lookup sits in front of every completion, so it
    is short), `write_timeout_s` for upserts and deletes; each call may pass its own `timeout_s`.
    `calls` traces them (`Tracing.client_calls()`; none by default).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        search_timeout_s: float = 2.0,
        write_timeout_s: float = 10.0,
        calls: ClientCalls = NO_CALL_TRACING,
    ) -> None:
        self._stub = vectors_pb2_grpc.VectorServiceStub(channel)
        self._calls = calls
        self._search_timeout_s = search_timeout_s
        self._write_timeout_s = write_timeout_s

    async def search(
        self,
        collection: str,
        text: str,
        *,
        where: Where | None = None,
        limit: int = 5,
        score_threshold: float | None = None,
        timeout_s: float | None = None,
    ) -> list[Hit]:
        request = pb.SearchRequest(
            collection=collection,
            text=text,
            filter=filter_to_pb(conditions(where)),
            limit=limit,
            score_threshold=score_threshold,
        )
        with rpc_errors(_SERVICE), self._calls.call(_SEARCH) as metadata:
            reply: pb.SearchResponse = await self._stub.Search(
                request, metadata=metadata, timeout=timeout_s or self._search_timeout_s
            )
        return [
            Hit(match.id, match.score, payload_from_pb(match.payload, f"matches[{i}].payload"))
            for i, match in enumerate(reply.matches)
        ]

    async def upsert(
        self, collection: str, points: Sequence[NewPoint], *, timeout_s: float | None = None
    ) -> int:
        request = pb.UpsertRequest(
            collection=collection,
            points=[
                pb.Point(id=str(point.id), text=point.text, payload=payload_to_pb(point.payload))
                for point in points
            ],
        )
        with rpc_errors(_SERVICE), self._calls.call(_UPSERT) as metadata:
            reply: pb.UpsertResponse = await self._stub.Upsert(
                request, metadata=metadata, timeout=timeout_s or self._write_timeout_s
            )
        return reply.upserted

    async def delete(self, collection: str, where: Where, *, timeout_s: float | None = None) -> int:
        request = pb.DeleteRequest(collection=collection, filter=filter_to_pb(conditions(where)))
        with rpc_errors(_SERVICE), self._calls.call(_DELETE) as metadata:
            reply: pb.DeleteResponse = await self._stub.Delete(
                request, metadata=metadata, timeout=timeout_s or self._write_timeout_s
            )
        return reply.deleted
