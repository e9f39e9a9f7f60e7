"""`VectorIndex` on Qdrant: a Qdrant server (`url`), or qdrant-client's embedded local mode (`path`).

Local mode is plain synchronous Python inside `AsyncQdrantClient`'s coroutines: an exact, brute-force
search that evaluates the payload filter point by point, with SQLite for persistence. Awaited on the
service's event loop it would stall every other call for the whole search (tens to hundreds of
milliseconds at 10k-100k points), and it is not safe to enter from two threads at once; so in local
mode every call runs on one dedicated thread with an event loop of its own, one call at a time. A
server client is truly asynchronous and runs on the caller's loop.

Local mode also holds a file lock on its directory: one process owns an index, which is why the index
lives in the embedding service and chat replicas reach it over gRPC.

Tenants (the payload key `tenant_key`, the semantic cache's `scope`): local mode's cost is the size of
the collection it scans, whatever the filter, so in local mode a collection is split into partitions,
one local collection per tenant value (`{collection}.t-{hash}`) plus the collection itself for points
without the key. A call whose filter has an exact condition on the tenant key goes to that tenant's
partition alone; any other goes to every partition (a search merges their best matches by score). The
partitions are this module's layout, invisible through `VectorIndex`. A Qdrant server keeps one
collection and gets the tenant key as a tenant payload index (`is_tenant`), its own multitenancy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from chatmesh.common.errors import ChatmeshError, InvalidArgument, NotFound, Unavailable
from chatmesh.vectors.values import Condition, Payload, PayloadValue, Range
from embedding_service.encoder import Vectors
from embedding_service.local_filters import speed_up_local_filters
from embedding_service.qdrant_local import CallerLoop, DedicatedLoop, Runner, open_local, use_write_ahead_log
from embedding_service.settings import EmbeddingSettings
from embedding_service.vector_index import Hit, PayloadKind

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SCHEMA = {
    PayloadKind.KEYWORD: models.PayloadSchemaType.KEYWORD,
    PayloadKind.INTEGER: models.PayloadSchemaType.INTEGER,
    PayloadKind.FLOAT: models.PayloadSchemaType.FLOAT,
    PayloadKind.BOOL: models.PayloadSchemaType.BOOL,
}

_PARTITION = ".t-"
"""Between a collection's name and the hash of a tenant value in its partitions' names. The service's
collection names have no `.`, so no collection can be taken for another's partition."""
_PARTITION_HASH_CHARS = 16


@dataclass(slots=True)
class _Collection:
    """What this process knows of a collection that exists."""

    dimension: int
    indexed: set[str] = field(default_factory=set)
    """Payload keys with a payload index (or, in local mode, that would have one)."""


class QdrantIndex:
    """`VectorIndex` over an `AsyncQdrantClient`; open one with `open_qdrant_index`.

    Collections use cosine distance; each payload key gets a payload index of its value's kind when it
    is first stored (on a server; local mode has no payload indexes), `tenant_key` a tenant index. In
    local mode (`local_path`, the client's directory) collections are partitioned by `tenant_key`. Every
    call is bounded by `timeout_s`, and Qdrant's errors become domain errors here, once.
    """

    def __init__(
        self,
        client: AsyncQdrantClient,
        runner: Runner,
        *,
        timeout_s: float,
        tenant_key: str,
        local_path: Path | None,
    ) -> None:
        self._client = client
        self._runner = runner
        self._timeout_s = timeout_s
        self._tenant_key = tenant_key
        self._local_path = local_path
        self._collections: dict[str, _Collection] = {}
        # Two first upserts into a new collection must not both create it.
        self._creating = asyncio.Lock()

    async def ensure_collection(self, name: str, dimension: int, keys: Mapping[str, PayloadKind]) -> None:
        known = await self._describe(name)
        if known is None:
            async with self._creating:
                known = await self._describe(name)
                if known is None:
                    known = await self._create(name, dimension)
        _check_dimension(name, known, dimension)
        for key, kind in keys.items():
            if key in known.indexed:
                continue
            if self._local_path is None:
                await self._call(
                    f"indexing payload key {key!r}",
                    f'payload["{key}"]',
                    self._client.create_payload_index(
                        name, key, field_schema=self._field_schema(key, kind), wait=True
                    ),
                )
            known.indexed.add(key)

    async def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: Vectors,
        payloads: Sequence[Mapping[str, PayloadValue]],
    ) -> None:
        points = [
            models.PointStruct(id=point_id, vector=vector, payload=dict(payload))
            for point_id, vector, payload in zip(ids, vectors.tolist(), payloads, strict=True)
        ]
        if self._local_path is None:
            await self._call("upsert", "points", self._client.upsert(collection, points=points, wait=True))
            return
        known = await self._describe(collection)
        if known is None:
            raise NotFound(f"the vector index has no collection {collection!r} to store points in")
        await self._call("upsert", "points", self._upsert_partitioned(collection, known.dimension, points))

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        where: Sequence[Condition],
        limit: int,
        score_threshold: float | None = None,
    ) -> list[Hit]:
        known = await self._describe(collection)
        if known is None:
            return []
        _check_dimension(collection, known, len(vector))
        selected = _qdrant_filter(self._within_partition(where))

        async def search_partitions() -> list[models.ScoredPoint]:
            found: list[models.ScoredPoint] = []
            for name in await self._targets(collection, where):
                response = await self._client.query_points(
                    name,
                    query=list(vector),
                    query_filter=selected,
                    limit=limit,
                    score_threshold=score_threshold,
                    with_payload=True,
                )
                found.extend(response.points)
            # Each partition's best `limit` are sorted already; a stable sort keeps one's order as is.
            return sorted(found, key=lambda point: point.score, reverse=True)[:limit]

        points = await self._call("search", "filter", search_partitions())
        return [Hit(str(point.id), point.score, _payload(point.payload)) for point in points]

    async def delete(self, collection: str, where: Sequence[Condition]) -> int:
        if not where:
            raise InvalidArgument(
                "filter", "must have at least one condition; an empty filter would delete every point"
            )
        if await self._describe(collection) is None:
            return 0
        selected = _qdrant_filter(where)

        async def count_then_delete() -> tuple[int, list[str]]:
            # Qdrant does not say how many points a delete removed, so count them first. In local mode
            # all of it runs as one call on the index's thread, so nothing can come in between.
            deleted = 0
            targets = await self._targets(collection, where)
            for name in targets:
                counted = await self._client.count(name, count_filter=selected, exact=True)
                if counted.count:
                    await self._client.delete(
                        name, points_selector=models.FilterSelector(filter=selected), wait=True
                    )
                deleted += counted.count
            return deleted, targets

        deleted, visited = await self._call("delete", "filter", count_then_delete())
        # Which partitions a delete scanned is what it cost in local mode (each is read point by point,
        # on the index's one thread): one without its tenant's exact condition visits them all.
        log.debug(
            "vector points deleted",
            extra={"collection": collection, "deleted": deleted, "partitions": visited},
        )
        return deleted

    async def close(self) -> None:
        try:
            await self._runner.run(self._client.close())
        finally:
            await asyncio.to_thread(self._runner.close)

    async def _describe(self, name: str) -> _Collection | None:
        """The collection `name` as this process knows it, looked up once; None if it does not exist."""
        known = self._collections.get(name)
        if known is not None:
            return known

        async def lookup() -> models.CollectionInfo | None:
            if not await self._client.collection_exists(name):
                return None
            return await self._client.get_collection(name)

        info = await self._call("collection lookup", "collection", lookup())
        if info is None:
            return None
        vectors = info.config.params.vectors
        if not isinstance(vectors, models.VectorParams):
            raise InvalidArgument(
                "collection", f"{name!r} has named vectors: it was not made by this service"
            )
        known = _Collection(vectors.size, set(info.payload_schema))
        self._collections[name] = known
        return known

    async def _create(self, name: str, dimension: int) -> _Collection:
        await self._call("collection create", "collection", self._create_physical(name, dimension))
        known = self._collections[name] = _Collection(dimension)
        return known

    async def _create_physical(self, name: str, dimension: int) -> None:
        """Create Qdrant collection `name` (a collection, or in local mode also a partition)."""
        params = models.VectorParams(size=dimension, distance=models.Distance.COSINE)
        await self._client.create_collection(name, vectors_config=params)
        if self._local_path is not None:
            use_write_ahead_log(self._local_path, name)
        log.info("vector collection created", extra={"collection": name, "dimension": dimension})

    def _field_schema(
        self, key: str, kind: PayloadKind
    ) -> models.PayloadSchemaType | models.KeywordIndexParams:
        if key == self._tenant_key and kind is PayloadKind.KEYWORD:
            # Qdrant then keeps each tenant's points together on disk and builds its search graph per
            # tenant, so a lookup confined to one tenant reads that tenant's points only.
            return models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)
        return _SCHEMA[kind]

    async def _targets(self, collection: str, where: Sequence[Condition]) -> list[str]:
        """The Qdrant collections that may hold `collection`'s points passing `where`: on a server the
        collection itself; in local mode its tenant's partition if `where` names one, else all of them.
        In local mode, call it on the index's thread (inside `_call`)."""
        if self._local_path is None:
            return [collection]
        tenant = _tenant(where, self._tenant_key)
        if tenant is None:
            return await self._partitions(collection)
        name = partition_name(collection, tenant)
        return [name] if await self._client.collection_exists(name) else []

    async def _partitions(self, collection: str) -> list[str]:
        """Every local partition of `collection`, the collection itself (the untenanted points) first."""
        response = await self._client.get_collections()
        names = {described.name for described in response.collections}
        partitions = sorted(name for name in names if _is_partition_of(collection, name))
        return ([collection] if collection in names else []) + partitions

    def _within_partition(self, where: Sequence[Condition]) -> list[Condition]:
        """`where` as a search of the partitions `_targets` picks for it must check it: in local mode,
        without the exact conditions on the tenant value that picked one partition, which every point
        there passes by construction (local mode checks each condition on each point, in Python)."""
        tenant = _tenant(where, self._tenant_key) if self._local_path is not None else None
        if tenant is None:
            return list(where)
        # The same type too: 1 == True in Python, but not to Qdrant (nor to the partition's name).
        return [
            c
            for c in where
            if not (c.key == self._tenant_key and type(c.match) is type(tenant) and c.match == tenant)
        ]

    def _partition_for(self, collection: str, payload: Payload | None) -> str:
        tenant = (payload or {}).get(self._tenant_key)
        return collection if tenant is None else partition_name(collection, tenant)

    async def _upsert_partitioned(
        self, collection: str, dimension: int, points: Sequence[models.PointStruct]
    ) -> None:
        """Store `points` in their tenants' partitions, creating those that are new. One call on the
        index's thread: nothing can come between removing a point's old copy and storing the new one."""
        batches: dict[str, list[models.PointStruct]] = {}
        for point in points:
            batches.setdefault(self._partition_for(collection, point.payload), []).append(point)
        existing = await self._partitions(collection)
        for name in existing:
            # An id names one point: one whose tenant changed must leave its old partition.
            moved = [point.id for target, batch in batches.items() if target != name for point in batch]
            if not moved:
                continue
            stale = await self._client.retrieve(name, moved, with_payload=False, with_vectors=False)
            if stale:
                await self._client.delete(
                    name, points_selector=models.PointIdsList(points=[p.id for p in stale]), wait=True
                )
        for name, batch in batches.items():
            if name not in existing:
                await self._create_physical(name, dimension)
            await self._client.upsert(name, points=batch, wait=True)

    async def _call(self, operation: str, field: str, call: Coroutine[Any, Any, _T]) -> _T:
        with _index_errors(operation, field, self._timeout_s):
            async with asyncio.timeout(self._timeout_s):
                return await self._runner.run(call)


@contextlib.contextmanager
def _index_errors(operation: str, field: str, timeout_s: float) -> Iterator[None]:
    """Qdrant's failures as domain errors, keeping the cause; `field` is the request field a rejected
    argument came from."""
    try:
        yield
    except ChatmeshError:
        raise
    except TimeoutError as exc:  # before OSError, of which it is a subclass
        raise Unavailable(f"the vector index did not finish the {operation} within {timeout_s:g} s") from exc
    except UnexpectedResponse as exc:
        if exc.status_code in (400, 422):
            raise InvalidArgument(field, f"rejected by the vector index: {_server_message(exc)}") from exc
        if exc.status_code == 404:
            raise NotFound(f"the vector index has no such collection: {_server_message(exc)}") from exc
        raise Unavailable(
            f"the vector index failed the {operation}: {exc.status_code} {_server_message(exc)}"
        ) from exc
    except ValueError as exc:
        # Local mode reports what a server would reject with 400 as ValueError.
        raise InvalidArgument(field, f"rejected by the vector index: {exc}") from exc
    except (ResponseHandlingException, httpx.HTTPError, OSError, RuntimeError) as exc:
        # Unreachable server, broken connection, a closed or locked local index.
        raise Unavailable(f"the vector index is unavailable ({operation}): {exc}") from exc


def _server_message(exc: UnexpectedResponse) -> str:
    try:
        status = exc.structured().get("status")
    except ValueError:
        return exc.reason_phrase
    error = status.get("error") if isinstance(status, dict) else None
    return str(error or exc.reason_phrase)


def _check_dimension(collection: str, known: _Collection, dimension: int) -> None:
    if known.dimension != dimension:
        raise InvalidArgument(
            "collection",
            f"{collection!r} holds {known.dimension}-dimensional vectors but this service's model makes"
            f" {dimension}: vectors of different models cannot be compared; use another collection",
        )


def partition_name(collection: str, tenant: PayloadValue) -> str:
    """The local collection that holds `collection`'s points whose tenant key has value `tenant`."""
    # JSON keeps "1", 1 and true apart, as Qdrant's exact match does; the hash keeps any value (length,
    # characters) within what a collection's directory name may be.
    digest = hashlib.sha1(json.dumps(tenant).encode(), usedforsecurity=False).hexdigest()
    return f"{collection}{_PARTITION}{digest[:_PARTITION_HASH_CHARS]}"


def _is_partition_of(collection: str, name: str) -> bool:
    prefix = collection + _PARTITION
    return name.startswith(prefix) and len(name) == len(prefix) + _PARTITION_HASH_CHARS


def _tenant(where: Sequence[Condition], key: str) -> str | int | bool | None:
    """The value an exact condition of `where` requires of the tenant key, if there is one."""
    for condition in where:
        if condition.key == key and not isinstance(condition.match, Range):
            return condition.match
    return None


def _qdrant_filter(where: Sequence[Condition]) -> models.Filter | None:
    if not where:
        return None
    return models.Filter(must=[_field_condition(condition) for condition in where])


def _field_condition(condition: Condition) -> models.FieldCondition:
    match = condition.match
    if isinstance(match, Range):
        return models.FieldCondition(key=condition.key, range=models.Range(**match.bounds()))
    return models.FieldCondition(key=condition.key, match=models.MatchValue(value=match))


def _payload(raw: Mapping[str, Any] | None) -> dict[str, PayloadValue]:
    # Only the scalar values this API stores; anything another writer added has no form in the API.
    return {key: value for key, value in (raw or {}).items() if isinstance(value, str | int | float | bool)}


@asynccontextmanager
async def open_qdrant_index(settings: EmbeddingSettings) -> AsyncIterator[QdrantIndex]:
    """The index the settings name: the Qdrant server at `vectors_url`, else local mode in
    `vectors_path` (created if missing). Closed (lock released, connections dropped) on exit."""
    runner: Runner
    local_path: Path | None = None
    if settings.vectors_url is not None:
        runner = CallerLoop()
        api_key = settings.vectors_api_key.get_secret_value() if settings.vectors_api_key else None
        # The constructor asks the server its version with a blocking request (to warn of an
        # incompatible one), so it runs off the loop. The client's own timeout is whole seconds;
        # `_call` enforces the exact one.
        client = await asyncio.to_thread(
            AsyncQdrantClient,
            url=settings.vectors_url,
            api_key=api_key,
            timeout=math.ceil(settings.vectors_timeout_s),
        )
        location = settings.vectors_url
    else:
        path = settings.vectors_path.resolve()
        speed_up_local_filters()
        runner = DedicatedLoop("qdrant-local")
        try:
            client = await runner.run(open_local(path))
        except BaseException:
            await asyncio.to_thread(runner.close)
            raise
        location = str(path)
        local_path = path
    index = QdrantIndex(
        client,
        runner,
        timeout_s=settings.vectors_timeout_s,
        tenant_key=settings.vectors_tenant_key,
        local_path=local_path,
    )
    log.info(
        "vector index open",
        extra={"mode": "server" if settings.vectors_url else "local", "location": location},
    )
    try:
        yield index
    finally:
        await index.close()
        log.info("vector index closed")
