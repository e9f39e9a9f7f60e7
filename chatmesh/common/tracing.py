"""OpenTelemetry traces: one per request, from Envoy through every service, exported over OTLP/gRPC.

Off unless a service's `OTLP_ENDPOINT` is set, and then nothing is installed: no interceptor, no
database hook, no exporter thread, so tracing costs nothing when off. When on, the composition root
opens a `Tracing` and hands its pieces to what it builds:

    async with open_tracing("chat", settings.otlp_endpoint) as tracing:
        server = create_server(tracing_interceptors=tracing.server_interceptors())
        channel = grpc.aio.insecure_channel(address, interceptors=tracing.client_interceptors())
        tracing.instrument_database(store.engine)

The trace context travels in W3C `traceparent` metadata (OpenTelemetry's default propagator), which is
what Envoy's OpenTelemetry tracer sends upstream. Spans say what happened, never what was said: no
message text, no tokens (`Authorization` is never recorded).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)


class Tracing:
    """The tracing a service runs with: a tracer provider exporting to OTLP, or none (off)."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """A server span per call, continuing the caller's trace (none when off)."""
        if self._provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(tracer_provider=self._provider)  # type: ignore[no-untyped-call]
        return [interceptor]

    def client_interceptors(self) -> list[Any]:
        """A client span per call, and the trace context sent along (none when off)."""
        if self._provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors: list[Any] = aio_client_interceptors(tracer_provider=self._provider)  # type: ignore[no-untyped-call]
        return interceptors

    def instrument_database(self, engine: Any) -> None:
        """A span per SQL statement of `engine` (an `AsyncEngine`); the statement, not its values."""
        if self._provider is None:
            return
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        # The instrumentation declares SQLAlchemy < 2.1 and would do nothing on 2.1; the cursor events it
        # hooks are unchanged in 2.1 (tests/e2e/test_tracing.py sees its spans, correctly parented).
        SQLAlchemyInstrumentor().instrument(
            engine=engine.sync_engine,
            tracer_provider=self._provider,
            enable_commenter=False,
            skip_dep_check=True,
        )


@asynccontextmanager
async def open_tracing(service: str, endpoint: str | None) -> AsyncIterator[Tracing]:
    """Tracing for `service`, exporting to the OTLP/gRPC collector at `endpoint` (`host:port`), or off
    when `endpoint` is None. On exit the spans still buffered are sent (within a few seconds)."""
    if endpoint is None:
        yield Tracing(None)
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": f"chatmesh-{service}"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True), schedule_delay_millis=500)
    )
    log.info("tracing on", extra={"otlp_endpoint": endpoint})
    try:
        yield Tracing(provider)
    finally:
        await asyncio.to_thread(provider.shutdown)
