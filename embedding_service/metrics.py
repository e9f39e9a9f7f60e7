"""The embedding service's Prometheus metrics: batch sizes, queue wait, texts encoded."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from chatmesh.common.metrics import FAST_BUCKETS_S, LATENCY_BUCKETS_S

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EmbeddingMetrics:
    """A `BatchObserver` for the micro-batcher; `rate(chatmesh_embedding_texts_total[1m])` is texts/s."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._batch_size = Histogram(
            "chatmesh_embedding_batch_size",
            "Texts per forward pass of the encoder.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self._queue_wait = Histogram(
            "chatmesh_embedding_queue_wait_seconds",
            "Time a request waited in the micro-batcher's queue before its batch started encoding.",
            buckets=FAST_BUCKETS_S,
            registry=registry,
        )
        self._encode = Histogram(
            "chatmesh_embedding_batch_seconds",
            "Time one batch took to encode.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._texts = Counter("chatmesh_embedding_texts", "Texts encoded.", registry=registry)
        self._failed = Counter(
            "chatmesh_embedding_failed_batches", "Batches whose encoding failed.", registry=registry
        )

    def batch_encoded(self, texts: int, queue_waits_s: Sequence[float], seconds: float, failed: bool) -> None:
        self._batch_size.observe(texts)
        for wait in queue_waits_s:
            self._queue_wait.observe(wait)
        self._encode.observe(seconds)
        if failed:
            self._failed.inc()
        else:
            self._texts.inc(texts)
