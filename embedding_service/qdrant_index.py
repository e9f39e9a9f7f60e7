"""`VectorIndex` on Qdrant: a Qdrant server (`url`), or qdrant-client's embedded local mode (`path`).

Local mode is plain synchronous Python inside `AsyncQdrantClient`'s coroutines: an exact, brute-force
search that evaluates the payload filter point by point, with SQLite for persistence. Awaited on the
service's event loop it would stall every other call for the whole search (tens to hundreds of
milliseconds at 10k-100k points), and it is not safe to enter from two threads at once; so in local
mode every call runs on one dedicated thread with an event loop of its own, one call at a time. A
server client is truly asynchronous and runs on the caller's loop.

Local mode also holds a file lock on its directory: one process owns an index, which is why the index
lives in the embedding service and chat replicas reach it over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from chatmesh.common.errors import ChatmeshError, InvalidArgument, NotFound, Unavailable
from chatmesh.vectors.values import Condition, PayloadValue, Range
from embedding_service.encoder import Vectors
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


class _Runner(Protocol):
    """Where the client's coroutines run."""

    async def run(self, call: Coroutine[Any, Any, _T]) -> _T: ...

    def close(self) -> None: ...


class _CallerLoop:
    """On the caller's event loop: for a client that really awaits I/O (a Qdrant server)."""

    async def run(self, call: Coroutine[Any, Any, _T]) -> _T:
        return await call

    def close(self) -> None:
        pass


class _DedicatedLoop:
    """On an event loop of its own, in one thread: for local mode, whose coroutines never yield.

    One thread serialises the calls, which local mode needs, and keeps its CPU-bound scans off the
    service's loop (they still share the GIL, but gRPC and the encoder's torch threads keep running)."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, call: Coroutine[Any, Any, _T]) -> _T:
        # A caller that gives up cancels the call if it has not started; one that started finishes
        # (local mode cannot be interrupted) and its result is dropped.
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self._loop))

    def close(self) -> None:
        """Stop the loop and join its thread (blocks until the call in progress, if any, ends)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@dataclass(slots=True)
class _Collection:
    """What this process knows of a collection that exists."""

    dimension: int
    indexed: set[str] = field(default_factory=set)
    """Payload keys with a payload index (or, in local mode, that would have one)."""


class QdrantIndex:
    """`VectorIndex` over an `AsyncQdrantClient`; open one with `open_qdrant_index`.

    Collections use cosine distance; each payload key gets a payload index of its value's kind when it
    is first stored (on a server; local mode has no payload indexes). Every call is bounded by
    `timeout_s`, and Qdrant's errors become domain errors here, once.
    """

    def __init__(
        self, client: AsyncQdrantClient, runner: _Runner, *, timeout_s: float, payload_indexes: bool
    ) -> None:
        self._client = client
        self._runner = runner
        self._timeout_s = timeout_s
        self._payload_indexes = payload_indexes
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
            if self._payload_indexes:
                await self._call(
                    f"indexing payload key {key!r}",
                    f'payload["{key}"]',
                    self._client.create_payload_index(name, key, field_schema=_SCHEMA[kind], wait=True),
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
        await self._call("upsert", "points", self._client.upsert(collection, points=points, wait=True))

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
        response = await self._call(
            "search",
            "filter",
            self._client.query_points(
                collection,
                query=list(vector),
                query_filter=_qdrant_filter(where),
                limit=limit,
                score_threshold=score_threshold,
                with_payload=True,
            ),
        )
        return [Hit(str(point.id), point.score, _payload(point.payload)) for point in response.points]

    async def delete(self, collection: str, where: Sequence[Condition]) -> int:
        if not where:
            raise InvalidArgument(
                "filter", "must have at least one condition; an empty filter would delete every point"
            )
        if await self._describe(collection) is None:
            return 0
        selected = _qdrant_filter(where)

        async def count_then_delete() -> int:
            # Qdrant does not say how many points a delete removed, so count them first. In local mode
            # both run as one call on the index's thread, so nothing can come in between.
            counted = await self._client.count(collection, count_filter=selected, exact=True)
            if counted.count:
                await self._client.delete(
                    collection, points_selector=models.FilterSelector(filter=selected), wait=True
                )
            return counted.count

        return await self._call("delete", "filter", count_then_delete())

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
        params = models.VectorParams(size=dimension, distance=models.Distance.COSINE)
        await self._call(
            "collection create", "collection", self._client.create_collection(name, vectors_config=params)
        )
        log.info("vector collection created", extra={"collection": name, "dimension": dimension})
        known = self._collections[name] = _Collection(dimension)
        return known

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
    runner: _Runner
    if settings.vectors_url is not None:
        runner = _CallerLoop()
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
        runner = _DedicatedLoop("qdrant-local")
        try:
            client = await runner.run(_open_local(path))
        except BaseException:
            await asyncio.to_thread(runner.close)
            raise
        location = str(path)
    index = QdrantIndex(
        client,
        runner,
        timeout_s=settings.vectors_timeout_s,
        payload_indexes=settings.vectors_url is not None,
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


async def _open_local(path: Path) -> AsyncQdrantClient:
    """Open local mode at `path`, creating it if missing (on the index's own thread: loading a large
    index takes a while)."""
    try:
        return AsyncQdrantClient(path=str(path))
    except RuntimeError as exc:
        # qdrant-client's words ("already accessed by another instance") do not say what to do here.
        raise RuntimeError(
            f"the vector index at {path} is in use by another process (local mode locks its directory):"
            " stop that process, point CHATMESH_EMBEDDING_VECTORS_PATH elsewhere, or use a Qdrant"
            " server with CHATMESH_EMBEDDING_VECTORS_URL"
        ) from exc
