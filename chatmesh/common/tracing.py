"""OpenTelemetry traces: one per request, from Envoy through every service, exported over OTLP/gRPC.

Off unless a service's `OTLP_ENDPOINT` is set, and then nothing is installed: no interceptor, no
database hook, no exporter thread, so tracing costs nothing when off. When on, the composition root
opens a `Tracing` and hands its pieces to what it builds (the gRPC interceptors are this module's own,
lean ones, and so are the database's statement spans):

    async with open_tracing("chat", settings.otlp_endpoint) as tracing:
        server = create_server(tracing_interceptors=tracing.server_interceptors())
        client = GrpcInferenceClient(channel, calls=tracing.client_calls())
        tracing.instrument_database(store.engine)

The trace context travels in W3C `traceparent` metadata (OpenTelemetry's default propagator), which is
what Envoy's OpenTelemetry tracer sends upstream. Spans say what happened, never what was said: no
message text, no tokens (`Authorization` is never recorded).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmesh.common.handlers import Context, WrappedHandlers, wrap_handler
from chatmesh.common.statements import statement_operation, watch_statements

log = logging.getLogger(__name__)

_UNTRACED: ContextVar[bool] = ContextVar("chatmesh_untraced", default=False)

_UNTRACED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Probes and tooling, called every few seconds by load balancers: no trace of their own."""


@contextmanager
def untraced() -> Iterator[None]:
    """Calls and statements made inside the block get no spans (periodic checks would otherwise start
    a trace of their own every few seconds)."""
    token = _UNTRACED.set(True)
    try:
        yield
    finally:
        _UNTRACED.reset(token)


class Tracing:
    """The tracing a service runs with: a tracer provider exporting to OTLP, or none (off)."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """A server span per call, continuing the caller's trace (none when off)."""
        if self._provider is None:
            return []
        return [TracingServerInterceptor(self._provider.get_tracer("chatmesh.grpc.server"))]

    def client_calls(self) -> ClientCalls:
        """A client span per outgoing call, and the trace context sent along (nothing when off)."""
        if self._provider is None:
            return NO_CALL_TRACING
        return ClientCalls(self._provider.get_tracer("chatmesh.grpc.client"))

    def instrument_database(self, engine: AsyncEngine) -> None:
        """A CLIENT span per SQL statement `engine` executes, under the span current at that moment:
        `db.system`, `db.name`, `db.operation` and the statement's text with its placeholders, never its
        values. (OpenTelemetry's SQLAlchemy instrumentation would also patch every engine of the
        process and add a span per connection checkout, doubling a short call's spans.)"""
        if self._provider is None:
            return
        tracer = self._provider.get_tracer("chatmesh.sql")
        system = engine.sync_engine.dialect.name
        database = engine.sync_engine.url.database or ""

        def start(statement: str) -> Span | None:
            if _UNTRACED.get():
                return None
            operation = statement_operation(statement)
            return tracer.start_span(
                f"{operation} {database}".strip(),
                kind=SpanKind.CLIENT,
                attributes={
                    "db.system": system,
                    "db.name": database,
                    "db.operation": operation,
                    "db.statement": statement,
                },
            )

        def end(span: Span | None, error: BaseException | None) -> None:
            if span is None:
                return
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.end()

        watch_statements(engine, start, end)


# Statuses that are the server's failure (OpenTelemetry's gRPC conventions); the rest are the caller's.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _method_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _record_status(span: Span, code: grpc.StatusCode, server: bool) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS or (not server and code is not grpc.StatusCode.OK):
        span.set_status(Status(StatusCode.ERROR, code.name))


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span around every call of any kind (a streaming response: around the whole stream),
    child of the trace context in the call's `traceparent` metadata, with the `rpc.*` attributes and
    the status code the client got.

    Written here rather than taken from opentelemetry-instrumentation-grpc, whose aio interceptors cost
    about 0.13-0.24 ms per call on this project's 2-core machines (this one: a span's ~25 µs and a
    metadata lookup); telemetry must stay within 5% of a 2 ms `ListChats`."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED_METHODS):
            return handler
        attributes = _method_attributes(method)
        tracer = self._tracer

        @asynccontextmanager
        async def traced(context: Context) -> AsyncIterator[None]:
            carrier = {
                key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
            }
            with tracer.start_as_current_span(
                method,
                context=propagate.extract(carrier),
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    yield
                except asyncio.CancelledError:
                    _record_status(span, grpc.StatusCode.CANCELLED, server=True)
                    raise
                except BaseException:
                    # An abort (the error interceptor's mapped status) or an unexpected failure.
                    _record_status(span, context.code() or grpc.StatusCode.UNKNOWN, server=True)
                    raise
                _record_status(span, context.code() or grpc.StatusCode.OK, server=True)

        return self._wrapped.get(method, handler, lambda: wrap_handler(handler, traced))


class ClientCalls:
    """Trace context for a client's outgoing calls: `call(method)` starts a CLIENT span and gives the
    metadata that carries it (`traceparent`), ending the span with the call's status:

        with rpc_errors("inference service"), calls.call(COUNT_TOKENS) as metadata:
            reply = await stub.CountTokens(request, metadata=metadata)

    The clients call it themselves rather than through a grpc.aio channel interceptor: an intercepted
    aio call costs about 65 µs more (measured, a span included) and passes every streamed message
    through one more wrapper. Off (`NO_CALL_TRACING`), `call` gives None metadata and records nothing.
    """

    def __init__(self, tracer: Tracer | None) -> None:
        self._tracer = tracer

    def call(self, method: str) -> AbstractContextManager[Sequence[tuple[str, str]] | None]:
        """Around one call of `method` (`/package.Service/Method`), streamed replies included: an
        exception leaving the block is its status (an `AioRpcError`'s code; CANCELLED when the caller
        gave up)."""
        if self._tracer is None:
            return _NO_CALL
        return _TracedCall(self._tracer, method)


class _NoCall(AbstractContextManager[None]):
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_CALL = _NoCall()

NO_CALL_TRACING = ClientCalls(None)
"""Calls without spans or trace context: tracing off."""


class _TracedCall(AbstractContextManager[Sequence[tuple[str, str]]]):
    __slots__ = ("_method", "_span", "_tracer")

    def __init__(self, tracer: Tracer, method: str) -> None:
        self._tracer = tracer
        self._method = method
        self._span: Span | None = None

    def __enter__(self) -> Sequence[tuple[str, str]]:
        carrier: dict[str, str] = {}
        if _UNTRACED.get():
            # A trace context marked not sampled: the server records nothing either.
            generator = RandomIdGenerator()
            unsampled = SpanContext(
                generator.generate_trace_id(), generator.generate_span_id(), is_remote=False
            )
            propagate.inject(carrier, context=trace.set_span_in_context(NonRecordingSpan(unsampled)))
            return tuple(carrier.items())
        self._span = self._tracer.start_span(
            self._method, kind=SpanKind.CLIENT, attributes=_method_attributes(self._method)
        )
        propagate.inject(carrier, context=trace.set_span_in_context(self._span))
        return tuple(carrier.items())

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        span = self._span
        if span is None:
            return
        if exc is None:
            code = grpc.StatusCode.OK
        elif isinstance(exc, grpc.aio.AioRpcError):
            code = exc.code()
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
        _record_status(span, code, server=False)
        span.end()


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
