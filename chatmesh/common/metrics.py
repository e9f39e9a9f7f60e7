"""Prometheus metrics: each service keeps its own registry and serves it on its own port at `/metrics`.

A registry per service (not prometheus-client's process-wide default) keeps services that share a
process, as in the tests, apart, and a composition root owns its metrics like any other backend:

    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry, model="gemma")
    async with serve_metrics(registry, settings.metrics_address):
        ...

Names follow the OpenTelemetry GenAI semantic conventions where one exists
(`gen_ai_server_time_to_first_token_seconds`, ...), with the attributes as labels
(`gen_ai_request_model`, `gen_ai_token_type`); the rest are `chatmesh_<service>_...`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0)
"""Request-scale latencies: a cache hit (ms) to a long generation (tens of seconds)."""

TOKEN_GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
"""Time per output token: 1-2 ms on a GPU, tens of ms on a CPU."""

FAST_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Database transactions, queue waits."""


def split_address(address: str) -> tuple[str, int]:
    """`host:port` as (host, port); `[::1]:9100` for IPv6."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


@asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, address: str | None) -> AsyncIterator[str | None]:
    """Serve `registry` at `http://<address>/metrics` until the block ends (None: not served).

    Yields the address it listens on (port 0 picks a free one)."""
    if address is None:
        yield None
        return
    host, port = split_address(address)
    try:
        server, thread = await asyncio.to_thread(start_http_server, port, host, registry)
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve metrics on {address}: {exc}; free that port or set the service's"
            " *_METRICS_ADDRESS to another one"
        ) from exc
    bound = f"{host}:{server.server_port}"
    log.info("metrics served", extra={"url": f"http://{bound}/metrics"})
    try:
        yield bound
    finally:
        server.shutdown()
        server.server_close()
        await asyncio.to_thread(thread.join, 5.0)
