"""Pieces every composition root uses: server construction, health + reflection, and SIGTERM handling."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatmesh.common.grpc_errors import ErrorMappingInterceptor

log = logging.getLogger(__name__)

# Generation prompts and embedding batches can be large; gRPC's 4 MiB default is too tight for a
# 32k-token conversation with overhead, and keepalives keep long idle streams healthy behind Envoy.
SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


# A service's channels to the services it depends on. gRPC backs off between reconnection attempts
# up to 120 s by default; a dependency that restarts must be used again within a second, and the
# health checks (chatmesh/common/health.py) keep calling while it is down.
CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
)


def create_server(
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tracing_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """A grpc.aio server whose servicers (and `extra_interceptors`) may raise `ChatmeshError`s;
    `tracing_interceptors` (from `Tracing.server_interceptors`) wrap everything, so a call's span holds
    its whole handling and the status the client got."""
    return grpc.aio.server(
        # First is outermost: error mapping must see what the other interceptors raise (e.g. auth).
        interceptors=[*tracing_interceptors, ErrorMappingInterceptor(), *extra_interceptors],
        options=SERVER_OPTIONS,
    )


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> health.aio.HealthServicer:
    """Register gRPC health checking and reflection for `service_names`; nothing reports SERVING until
    `set_serving` (called once the server has started)."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Sequence[str]) -> None:
    """Mark the server and each named service SERVING."""
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def wait_for_shutdown_signal() -> signal.Signals:
    """Block until SIGTERM or SIGINT arrives; returns the signal."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await received
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def serve_until_signal(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    service_names: Sequence[str],
    grace_s: float,
) -> None:
    """Start `server`, report SERVING, and on SIGTERM/SIGINT drain in-flight calls for up to `grace_s`."""
    await server.start()
    await set_serving(health_servicer, service_names)
    log.info("serving", extra={"services": list(service_names)})
    sig = await wait_for_shutdown_signal()
    log.info("shutting down", extra={"signal": sig.name, "grace_s": grace_s})
    # NOT_SERVING first so load balancers stop sending new calls while in-flight ones finish.
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
    log.info("stopped")
