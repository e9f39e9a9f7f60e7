"""The Envoy config of the gateway, rendered from typed settings and the API's descriptor set.

One listener serves both faces of the public API:

- REST+JSON, transcoded to gRPC by `grpc_json_transcoder` from the `google.api.http` annotations in the
  descriptor set; completions stream back as server-sent events (`data: {json}` per event);
- native gRPC, passed through unchanged (gRPC clients call the same port with HTTP/2).

Every ChatService call needs a valid bearer token (HS256 shared secret or RS256 public key), checked at
the edge by `jwt_authn` (and again by the service, which gets the header forwarded); each token subject
gets its own token bucket (`local_ratelimit` with a wildcard descriptor fed by the `sub` claim). Envoy
load-balances over the chat replicas with active gRPC health checks, outlier detection and retries
that never repeat a streaming call that may have reached a replica.

This module composes the parts, one concern each: `routes` (the route table), `filters` (the HTTP filter
chain; `jwks` the keys, `rest_errors` with `rest_errors.lua` the REST error vocabulary), `local_replies`
(Envoy's own answers), `clusters` (the chat replicas), `tracing`, `metrics` (the metrics listener).
Nothing in them names a method or a path of the API: the routes, the 404/405 answers, which calls
stream, which answer 202 and where the OpenAI-compatible API lives all come from the descriptor set
(`api.py`); the paths the gateway serves itself (the web page, `/openapi.json`, the metrics) are named
once, in `routes.py` and `metrics.py`. The config is built as data and written as JSON (a subset of
YAML, which Envoy reads by extension), so nothing needs escaping and every value comes from typed
settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.api import DEV_SIGN_IN_SERVICE, PUBLIC_SERVICES, ServiceApi, default_descriptor_path
from gateway.clusters import chat_clusters
from gateway.envoy_json import http_connection_manager, seconds, typed
from gateway.filters import http_filters
from gateway.local_replies import local_reply_config
from gateway.metrics import admin_cluster, metrics_listener
from gateway.routes import route_config
from gateway.settings import GatewaySettings
from gateway.tracing import traces_cluster, tracing


def descriptor_path_for(settings: GatewaySettings, descriptor_path: Path | None = None) -> Path:
    """The descriptor set to transcode with: the argument, else the setting, else the packaged one."""
    return (descriptor_path or settings.descriptor_path or default_descriptor_path()).resolve()


def _connection_manager(settings: GatewaySettings, api: ServiceApi, descriptor_path: Path) -> dict[str, Any]:
    """The public listener's HTTP connection manager, as its fields."""
    hcm: dict[str, Any] = {
        "stat_prefix": "public",
        # HTTP/1.1 for REST clients and HTTP/2 (prior knowledge, as gRPC clients speak it) on one port.
        "codec_type": "AUTO",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "stream_idle_timeout": seconds(settings.stream_idle_timeout_s),
        "request_headers_timeout": "10s",
        "common_http_protocol_options": {
            "idle_timeout": "3600s",
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "local_reply_config": local_reply_config(settings),
        # The OpenAPI document is written next to the descriptor set by `make protos`.
        "route_config": route_config(settings, api, descriptor_path.parent / "openapi.json"),
        "http_filters": http_filters(settings, api, descriptor_path),
    }
    if settings.otlp_endpoint:
        hcm["tracing"] = tracing(settings)
    if settings.access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"),
            }
        ]
    return hcm


def _overload_manager() -> dict[str, Any]:
    """A cap on downstream connections (Envoy warns at start-up when there is none)."""
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    max_active_downstream_connections=50_000,
                ),
            }
        ]
    }


def build_envoy_config(settings: GatewaySettings, descriptor_path: Path | None = None) -> dict[str, Any]:
    """The Envoy bootstrap for `settings` as a dictionary (see `render_envoy_config`)."""
    descriptor_path = descriptor_path_for(settings, descriptor_path)
    services = PUBLIC_SERVICES + ((DEV_SIGN_IN_SERVICE,) if settings.dev_sign_in else ())
    api = ServiceApi.load(descriptor_path, services)
    public = {
        "name": "public",
        "address": {"socket_address": {"address": settings.listen_host, "port_value": settings.listen_port}},
        "filter_chains": [
            {"filters": [http_connection_manager(**_connection_manager(settings, api, descriptor_path))]}
        ],
    }
    listeners = [public]
    clusters = chat_clusters(settings)
    if settings.otlp_endpoint:
        clusters.append(traces_cluster(settings.otlp_endpoint, settings))
    if settings.metrics_port is not None:
        listeners.append(metrics_listener(settings, settings.metrics_port))
        clusters.append(admin_cluster(settings))
    return {
        "admin": {
            "address": {"socket_address": {"address": settings.admin_host, "port_value": settings.admin_port}}
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": _overload_manager(),
    }


def render_envoy_config(settings: GatewaySettings, descriptor_path: Path | None = None) -> str:
    """The Envoy bootstrap for `settings` as JSON text; `descriptor_path` is the transcoder's
    descriptor set (default: `settings.descriptor_path`, else the one shipped in this package)."""
    return json.dumps(build_envoy_config(settings, descriptor_path), indent=2) + "\n"
