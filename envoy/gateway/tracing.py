"""Tracing: Envoy's OpenTelemetry tracer and the cluster of the OTLP/gRPC collector it sends spans to
(both only with `otlp_endpoint`)."""

from __future__ import annotations

from typing import Any

from gateway.envoy_json import is_ip, load_assignment, seconds, typed
from gateway.settings import GatewaySettings, split_host_port

TRACES_CLUSTER = "otlp_collector"


def tracing(settings: GatewaySettings) -> dict[str, Any]:
    """Envoy's OpenTelemetry tracer: a span for each request (continuing the caller's W3C `traceparent`,
    or starting a trace) and one for each upstream attempt, whose context goes to the chat replica."""
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": TRACES_CLUSTER}, "timeout": "1s"},
                service_name="chatmesh-gateway",
            ),
        },
        "spawn_upstream_span": True,
    }


def traces_cluster(endpoint: str, settings: GatewaySettings) -> dict[str, Any]:
    """The collector at `endpoint` (host:port), over HTTP/2."""
    host, port = split_host_port(endpoint)
    return {
        "name": TRACES_CLUSTER,
        "type": "STATIC" if is_ip(host) else "STRICT_DNS",
        "connect_timeout": seconds(settings.connect_timeout_s),
        "load_assignment": load_assignment(TRACES_CLUSTER, [(host, port)]),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
    }
