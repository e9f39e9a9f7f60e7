"""gRPC servicer of chatmesh.embedding.v1.EmbeddingService."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from chatmesh.common.errors import InvalidArgument
from chatmesh.embedding.v1 import embedding_pb2 as pb
from chatmesh.embedding.v1 import embedding_pb2_grpc
from embedding_service.batcher import MicroBatcher
from embedding_service.encoder import Encoder
from embedding_service.settings import EmbeddingSettings

# grpc.aio.ServicerContext; grpcio ships no type information.
Context: TypeAlias = Any


def validate_texts(texts: Sequence[str], max_texts: int, max_chars: int) -> None:
    """Raise `InvalidArgument` naming the offending field unless `texts` is an acceptable Embed input."""
    if not texts:
        raise InvalidArgument("texts", "must contain at least one text")
    if len(texts) > max_texts:
        raise InvalidArgument("texts", f"has {len(texts)} texts; at most {max_texts} are allowed per request")
    for i, text in enumerate(texts):
        # A blank text has no meaning to embed; its vector would only pollute a cache or an index.
        if not text.strip():
            raise InvalidArgument(f"texts[{i}]", "must not be empty or whitespace only")
        if len(text) > max_chars:
            raise InvalidArgument(f"texts[{i}]", f"has {len(text)} characters; the limit is {max_chars}")


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    """Validates requests and embeds them through the shared micro-batcher."""

    def __init__(self, batcher: MicroBatcher, encoder: Encoder, settings: EmbeddingSettings) -> None:
        self._batcher = batcher
        self._encoder = encoder
        self._settings = settings

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        texts = list(request.texts)
        validate_texts(texts, self._settings.max_texts_per_request, self._settings.max_text_chars)
        vectors = await self._batcher.embed(texts)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in vectors.tolist()],
            model=self._encoder.model_name,
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model=self._encoder.model_name,
            dimension=self._encoder.dimension,
            max_texts_per_request=self._settings.max_texts_per_request,
            max_text_chars=self._settings.max_text_chars,
        )
