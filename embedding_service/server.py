"""Composition root of the embedding service: settings -> encoder -> batcher -> servicer -> serve."""

from __future__ import annotations

import logging

from chatmesh.common.logs import configure_logging
from chatmesh.common.server import add_health_and_reflection, create_server, serve_until_signal
from chatmesh.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from embedding_service.batcher import MicroBatcher
from embedding_service.encoder import open_sentence_transformer_encoder
from embedding_service.servicer import EmbeddingServicer
from embedding_service.settings import EmbeddingSettings

log = logging.getLogger(__name__)

SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


async def serve(settings: EmbeddingSettings) -> None:
    """Run the embedding service until SIGTERM/SIGINT."""
    configure_logging("embedding", settings.log_level, settings.log_format)
    log.info("starting", extra={"address": settings.address, "model": settings.model_name})
    async with (
        open_sentence_transformer_encoder(settings) as encoder,
        MicroBatcher(
            encoder, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms
        ) as batcher,
    ):
        server = create_server()
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingServicer(batcher, encoder, settings), server
        )
        health = add_health_and_reflection(server, [SERVICE_NAME])
        server.add_insecure_port(settings.address)
        await serve_until_signal(server, health, [SERVICE_NAME], settings.shutdown_grace_s)
        stats = batcher.stats
        log.info(
            "batcher totals",
            extra={
                "requests": stats.requests,
                "batches": stats.batches,
                "texts": stats.texts,
                "failed_batches": stats.failed_batches,
            },
        )
