"""The chat replicas as Envoy clusters: least-request load balancing, active gRPC health checks, outlier
detection, circuit breakers; and, when completions are capped, a second cluster of the same replicas for
the streaming calls alone."""

from __future__ import annotations

import copy
from typing import Any

from gateway.api import CHAT_SERVICE
from gateway.envoy_json import is_ip, load_assignment, seconds, typed
from gateway.settings import GatewaySettings, split_host_port

CHAT_CLUSTER = "chat"
"""The chat replicas."""

COMPLETIONS_CLUSTER = "chat_completions"
"""The chat replicas again, for the streaming routes alone, when `max_active_completions` caps them."""


def _health_check(settings: GatewaySettings) -> dict[str, Any]:
    return {
        "timeout": seconds(settings.health_check_timeout_s),
        "interval": seconds(settings.health_check_interval_s),
        # Keep checking at the normal pace while the cluster is idle (the default is 60 s).
        "no_traffic_interval": seconds(settings.health_check_interval_s),
        "unhealthy_threshold": settings.unhealthy_threshold,
        "healthy_threshold": settings.healthy_threshold,
        # A replica reports NOT_SERVING for this service while it drains on SIGTERM.
        # One process serves every public service: its ChatService status stands for all.
        "grpc_health_check": {"service_name": CHAT_SERVICE},
    }


def _outlier_detection(settings: GatewaySettings) -> dict[str, Any]:
    return {
        # gRPC statuses count as their HTTP equivalents (UNAVAILABLE = 503, INTERNAL = 500).
        "consecutive_5xx": settings.outlier_consecutive_errors,
        "consecutive_gateway_failure": settings.outlier_consecutive_errors,
        "interval": "5s",
        "base_ejection_time": seconds(settings.outlier_base_ejection_s),
        # Never eject so many replicas that the rest drown; with two, at most one goes.
        "max_ejection_percent": settings.outlier_max_ejection_percent,
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 3,
    }


def _chat_cluster(settings: GatewaySettings) -> dict[str, Any]:
    endpoints = [split_host_port(address) for address in settings.chat_addresses]
    return {
        "name": CHAT_CLUSTER,
        "type": "STATIC" if all(is_ip(host) for host, _ in endpoints) else "STRICT_DNS",
        "connect_timeout": seconds(settings.connect_timeout_s),
        # Completions hold a replica for seconds, list calls for a millisecond: least-request spreads
        # the long streams instead of counting turns.
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": load_assignment(CHAT_CLUSTER, endpoints),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={
                    "http2_protocol_options": {
                        # Notices a replica that vanished without closing its connections.
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"},
                    }
                },
            )
        },
        "health_checks": [_health_check(settings)],
        "outlier_detection": _outlier_detection(settings),
        "common_lb_config": {
            # A replica reports NOT_SERVING while its database or engine is unreachable. When that is
            # one replica's own trouble, the others take its calls; when fewer than half are healthy it
            # is usually a shared dependency, and Envoy then tries them all ("panic" routing): reads of
            # the history still work while the engine is down, and completions fail with the replica's
            # own clear UNAVAILABLE rather than a blanket "no healthy upstream".
            "healthy_panic_threshold": {"value": 50},
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": settings.max_upstream_requests,
                    "max_pending_requests": settings.max_upstream_requests,
                    "max_requests": settings.max_upstream_requests,
                    "max_retries": max(3, settings.max_upstream_requests // 10),
                }
            ]
        },
    }


def chat_clusters(settings: GatewaySettings) -> list[dict[str, Any]]:
    """The chat replicas; with `max_active_completions`, a second cluster of the same replicas for the
    completions, whose circuit breaker admits that many at once (a breaker counts per cluster, so the
    cap leaves the short calls alone)."""
    chat = _chat_cluster(settings)
    if not settings.max_active_completions:
        return [chat]
    cap = settings.max_active_completions
    completions = copy.deepcopy(chat)
    completions["name"] = COMPLETIONS_CLUSTER
    completions["load_assignment"]["cluster_name"] = COMPLETIONS_CLUSTER
    completions["circuit_breakers"]["thresholds"][0].update(max_requests=cap, max_pending_requests=cap)
    return [chat, completions]
