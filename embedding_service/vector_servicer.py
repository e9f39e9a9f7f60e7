"""gRPC servicer of chatmesh.vectors.v1.VectorService: validate, embed (shared micro-batcher), index."""

from __future__ import annotations

import math
import re
import uuid
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from chatmesh.common.errors import InvalidArgument
from chatmesh.vectors.v1 import vectors_pb2 as pb
from chatmesh.vectors.v1 import vectors_pb2_grpc
from chatmesh.vectors.values import Condition, PayloadValue, filter_from_pb, payload_from_pb, value_to_pb
from embedding_service.batcher import MicroBatcher
from embedding_service.encoder import Encoder, Vectors
from embedding_service.servicer import Context
from embedding_service.settings import EmbeddingSettings
from embedding_service.vector_index import PayloadKind, VectorIndex

DEFAULT_LIMIT = 5
MAX_LIMIT = 100
MAX_CONDITIONS = 16
MAX_PAYLOAD_KEYS = 32
MAX_PAYLOAD_TEXT_CHARS = 65_536
"""A payload string may hold a cached answer, far longer than a text worth embedding."""

_COLLECTION = re.compile(r"[A-Za-z0-9_-]{1,64}")
# No dots: Qdrant reads `a.b` as the path to a nested value, which a flat payload never has.
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def validate_collection(name: str) -> str:
    """`name` if it is a valid collection name, else `InvalidArgument` on `collection`."""
    if not _COLLECTION.fullmatch(name):
        raise InvalidArgument(
            "collection", f"{name!r} is not a collection name: use 1 to 64 letters, digits, _ or -"
        )
    return name


def validate_text(field: str, text: str, max_chars: int) -> None:
    """`InvalidArgument` on `field` unless `text` is worth embedding and within `max_chars`."""
    if not text.strip():
        raise InvalidArgument(field, "must not be empty or whitespace only")
    if len(text) > max_chars:
        raise InvalidArgument(field, f"has {len(text)} characters; the limit is {max_chars}")


def validate_key(field: str, key: str) -> None:
    """`InvalidArgument` on `field` unless `key` is a valid payload key."""
    if not _KEY.fullmatch(key):
        raise InvalidArgument(
            field,
            f"{key!r} is not a payload key: use 1 to 64 letters, digits or _, not starting with a digit",
        )


def validate_limit(limit: int) -> int:
    """The number of matches to return: `limit`, or the default for 0; `InvalidArgument` if out of range."""
    if limit == 0:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(
            "limit", f"is {limit}; use 1 to {MAX_LIMIT} (0 for the default, {DEFAULT_LIMIT})"
        )
    return limit


def validate_filter(where: pb.Filter, field: str) -> list[Condition]:
    """The conditions of `where`, validated; errors name the condition (`filter.must[2].key`)."""
    if len(where.must) > MAX_CONDITIONS:
        raise InvalidArgument(
            f"{field}.must", f"has {len(where.must)} conditions; at most {MAX_CONDITIONS} are allowed"
        )
    for i, condition in enumerate(where.must):
        validate_key(f"{field}.must[{i}].key", condition.key)
    return filter_from_pb(where, field)


def validate_score_threshold(request: pb.SearchRequest) -> float | None:
    """The request's score threshold, if set; `InvalidArgument` unless it is a cosine similarity."""
    if not request.HasField("score_threshold"):
        return None
    threshold = request.score_threshold
    if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise InvalidArgument("score_threshold", f"is {threshold}; a cosine similarity is between -1 and 1")
    return threshold


def validate_payload(field: str, payload: dict[str, pb.Value]) -> dict[str, PayloadValue]:
    """The Python form of a point's payload, validated; errors name the entry (`points[0].payload["k"]`)."""
    if len(payload) > MAX_PAYLOAD_KEYS:
        raise InvalidArgument(field, f"has {len(payload)} keys; at most {MAX_PAYLOAD_KEYS} are allowed")
    for key in payload:
        validate_key(field, key)
    values = payload_from_pb(payload, field)
    for key, value in values.items():
        if isinstance(value, str) and len(value) > MAX_PAYLOAD_TEXT_CHARS:
            raise InvalidArgument(
                f'{field}["{key}"]', f"has {len(value)} characters; the limit is {MAX_PAYLOAD_TEXT_CHARS}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f'{field}["{key}"]', f"must be a finite number, not {value}")
    return values


def validate_point_id(field: str, point_id: str) -> str:
    """The canonical (lower-case, hyphenated) form of a UUID, else `InvalidArgument` on `field`."""
    try:
        return str(uuid.UUID(point_id))
    except ValueError:
        raise InvalidArgument(field, f"{point_id!r} is not a UUID; point ids are UUIDs") from None


def payload_kinds(payloads: Sequence[dict[str, PayloadValue]]) -> dict[str, PayloadKind]:
    """Each payload key with the kind of its first value (the kind its payload index gets)."""
    kinds: dict[str, PayloadKind] = {}
    for payload in payloads:
        for key, value in payload.items():
            kinds.setdefault(key, PayloadKind.of(value))
    return kinds


class RecentEmbeddings:
    """The vectors of the texts stored or searched most recently, by exact text (least recently used
    dropped first).

    A semantic cache mostly sees the same question again, word for word: the text it stored, or asked a
    moment ago. Embedding it again costs a model forward pass (most of a lookup's time on a CPU) for a
    vector the service already computed; the model is deterministic, so the remembered vector is the
    same one.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._vectors: OrderedDict[str, Vectors] = OrderedDict()

    async def embed(self, batcher: MicroBatcher, texts: Sequence[str]) -> list[Vectors]:
        """One vector per text: remembered ones as they are, the others from `batcher` (one batch)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            for text, vector in zip(missing, await batcher.embed(missing), strict=True):
                self._vectors[text] = vector.copy()  # not a view that would keep its whole batch alive
        found = [self._vectors[text] for text in texts]
        for text in texts:
            self._vectors.move_to_end(text)
        while len(self._vectors) > self._capacity:
            self._vectors.popitem(last=False)
        return found


class VectorServicer(vectors_pb2_grpc.VectorServiceServicer):
    """Validates requests, embeds their texts through the micro-batcher Embed uses, and hands the
    vectors to the index. Everything is checked before any text is embedded."""

    def __init__(
        self, index: VectorIndex, batcher: MicroBatcher, encoder: Encoder, settings: EmbeddingSettings
    ) -> None:
        self._index = index
        self._batcher = batcher
        self._encoder = encoder
        self._settings = settings
        self._recent = RecentEmbeddings()

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        collection = validate_collection(request.collection)
        validate_text("text", request.text, self._settings.max_text_chars)
        where = validate_filter(request.filter, "filter")
        limit = validate_limit(request.limit)
        threshold = validate_score_threshold(request)
        (vector,) = await self._recent.embed(self._batcher, [request.text])
        hits = await self._index.search(collection, vector.tolist(), where, limit, threshold)
        return pb.SearchResponse(
            matches=[
                pb.Match(
                    id=hit.id,
                    score=hit.score,
                    payload={key: value_to_pb(value) for key, value in hit.payload.items()},
                )
                for hit in hits
            ],
            model=self._encoder.model_name,
        )

    async def Upsert(self, request: pb.UpsertRequest, context: Context) -> pb.UpsertResponse:
        collection = validate_collection(request.collection)
        most = self._settings.max_texts_per_request
        if not request.points:
            raise InvalidArgument("points", "must contain at least one point")
        if len(request.points) > most:
            raise InvalidArgument(
                "points", f"has {len(request.points)} points; at most {most} are allowed per request"
            )
        ids: list[str] = []
        payloads: list[dict[str, PayloadValue]] = []
        for i, point in enumerate(request.points):
            point_id = validate_point_id(f"points[{i}].id", point.id)
            if point_id in ids:
                # Two vectors for one id in one call: which one wins would be an accident.
                raise InvalidArgument(f"points[{i}].id", f"{point_id} appears twice in this request")
            ids.append(point_id)
            validate_text(f"points[{i}].text", point.text, self._settings.max_text_chars)
            payloads.append(validate_payload(f"points[{i}].payload", dict(point.payload)))
        vectors = np.stack(await self._recent.embed(self._batcher, [point.text for point in request.points]))
        await self._index.ensure_collection(collection, self._encoder.dimension, payload_kinds(payloads))
        await self._index.upsert(collection, ids, vectors, payloads)
        return pb.UpsertResponse(upserted=len(ids), model=self._encoder.model_name)

    async def Delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        collection = validate_collection(request.collection)
        where = validate_filter(request.filter, "filter")
        if not where:
            raise InvalidArgument(
                "filter",
                "must have at least one condition: an empty filter would delete every point of the"
                " collection",
            )
        return pb.DeleteResponse(deleted=await self._index.delete(collection, where))
