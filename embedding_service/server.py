"""Composition root of the embedding service: settings -> vector index, encoder -> batcher -> servicers
-> serve."""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractAsyncContextManager

from prometheus_client import CollectorRegistry

from chatmesh.common.logs import configure_logging
from chatmesh.common.metrics import serve_metrics
from chatmesh.common.server import add_health_and_reflection, create_server, serve_until_signal
from chatmesh.common.tracing import open_tracing
from chatmesh.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from chatmesh.vectors.v1 import vectors_pb2, vectors_pb2_grpc
from embedding_service.batcher import MicroBatcher
from embedding_service.encoder import open_encoder
from embedding_service.metrics import EmbeddingMetrics
from embedding_service.qdrant_index import open_qdrant_index
from embedding_service.servicer import EmbeddingServicer
from embedding_service.settings import EmbeddingSettings
from embedding_service.vector_index import VectorIndex
from embedding_service.vector_servicer import VectorServicer

log = logging.getLogger(__name__)

SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
VECTOR_SERVICE_NAME = vectors_pb2.DESCRIPTOR.services_by_name["VectorService"].full_name


def open_vector_index(settings: EmbeddingSettings) -> AbstractAsyncContextManager[VectorIndex | None]:
    """The vector index the settings choose (Qdrant, server or local mode), or None when disabled."""
    if not settings.vectors_enabled:
        return contextlib.nullcontext(None)
    return open_qdrant_index(settings)


async def serve(settings: EmbeddingSettings) -> None:
    """Run the embedding service (and the vector service, unless disabled) until SIGTERM/SIGINT."""
    configure_logging("embedding", settings.log_level, settings.log_format)
    log.info("starting", extra={"address": settings.address, "model": settings.model_name})
    registry = CollectorRegistry()
    async with (
        open_tracing("embedding", settings.otlp_endpoint) as tracing,
        # First: a locked or unreachable index fails the start before the model spends seconds loading.
        open_vector_index(settings) as index,
        serve_metrics(registry, settings.metrics_address),
        open_encoder(settings) as encoder,
        MicroBatcher(
            encoder,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            observer=EmbeddingMetrics(registry),
        ) as batcher,
    ):
        server = create_server(tracing_interceptors=tracing.server_interceptors())
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingServicer(batcher, encoder, settings), server
        )
        services = [SERVICE_NAME]
        if index is not None:
            vectors_pb2_grpc.add_VectorServiceServicer_to_server(
                VectorServicer(index, batcher, encoder, settings), server
            )
            services.append(VECTOR_SERVICE_NAME)
        health = add_health_and_reflection(server, services)
        server.add_insecure_port(settings.address)
        await serve_until_signal(server, health, services, settings.shutdown_grace_s)
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
