"""The vector index interface the VectorService depends on: store and find unit vectors with payloads.

Policy-free: it knows nothing of caches, users or expiry; callers express those as payload values and
hard filters. The real implementation is `embedding_service.qdrant_index.QdrantIndex`, chosen in the
composition root.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chatmesh.vectors.values import Condition, PayloadValue
from embedding_service.encoder import Vectors


class PayloadKind(enum.Enum):
    """How a payload key is indexed for filtering (on a Qdrant server: its payload index type)."""

    KEYWORD = "keyword"
    INTEGER = "integer"
    FLOAT = "float"
    BOOL = "bool"

    @classmethod
    def of(cls, value: PayloadValue) -> PayloadKind:
        """The kind of index that filters on `value`'s type."""
        # bool before int: True is an int to Python.
        if isinstance(value, bool):
            return cls.BOOL
        if isinstance(value, int):
            return cls.INTEGER
        if isinstance(value, float):
            return cls.FLOAT
        return cls.KEYWORD


@dataclass(frozen=True, slots=True)
class Hit:
    """A stored point found by `VectorIndex.search`."""

    id: str
    score: float
    """Cosine similarity to the query vector."""
    payload: dict[str, PayloadValue] = field(default_factory=dict)


class VectorIndex(Protocol):
    """Named collections of unit vectors with payloads, searched by cosine similarity.

    Ids are UUID strings. Filters are conjunctions of `Condition`s and are hard: a point that fails
    them is never returned. Errors are domain errors (`InvalidArgument`, `Unavailable`, ...).
    """

    async def ensure_collection(self, name: str, dimension: int, keys: Mapping[str, PayloadKind]) -> None:
        """Create collection `name` for `dimension`-long vectors unless it exists, and make sure each of
        `keys` is indexed for filtering with its kind. `InvalidArgument` if it exists with another
        dimension (vectors of another model)."""
        ...

    async def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: Vectors,
        payloads: Sequence[Mapping[str, PayloadValue]],
    ) -> None:
        """Store point `ids[i]` with `vectors[i]` and `payloads[i]`, replacing a point with that id. The
        collection must exist (`ensure_collection`)."""
        ...

    async def search(
        self,
        collection: str,
        vector: Sequence[float],
        where: Sequence[Condition],
        limit: int,
        score_threshold: float | None = None,
    ) -> list[Hit]:
        """The at most `limit` points most similar to `vector` that pass `where` (and score at least
        `score_threshold`), best first; none if the collection does not exist."""
        ...

    async def delete(self, collection: str, where: Sequence[Condition]) -> int:
        """Delete the points that pass `where` (which must not be empty); return how many there were.
        A collection that does not exist has none."""
        ...

    async def close(self) -> None:
        """Release the index (file lock, connections). Nothing may be called afterwards."""
        ...
