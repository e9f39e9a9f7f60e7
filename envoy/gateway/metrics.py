"""The metrics listener (with `metrics_port`): Envoy's Prometheus metrics and readiness for scrapers and
probes, proxied to the admin interface, which itself stays on loopback."""

from __future__ import annotations

from typing import Any

from gateway.envoy_json import http_connection_manager, load_assignment, router, seconds
from gateway.settings import GatewaySettings

ADMIN_CLUSTER = "envoy_admin"
METRICS_PATHS = ("/stats/prometheus", "/ready")
"""What the metrics listener serves of the admin interface: the Prometheus metrics, and readiness for
probes. Nothing else of the admin (/config_dump, /quitquitquit, /logging, ...) is reachable there."""


def metrics_listener(settings: GatewaySettings, port: int) -> dict[str, Any]:
    """A listener serving GET /stats/prometheus and /ready, each proxied to the loopback admin interface."""
    get_only = [{"name": ":method", "string_match": {"safe_regex": {"regex": "^(GET|HEAD)$"}}}]
    routes: list[dict[str, Any]] = [
        {
            "name": f"metrics {path}",
            # An exact path after normalisation (below): no `..`, `%2F` or `//` detour reaches another.
            "match": {"path": path, "headers": get_only},
            "route": {"cluster": ADMIN_CLUSTER, "timeout": "10s"},
        }
        for path in METRICS_PATHS
    ]
    routes.append(
        {
            "name": "metrics not-found",
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 404,
                "body": {"inline_string": f"only GET {' and '.join(METRICS_PATHS)} here\n"},
            },
        }
    )
    hcm = http_connection_manager(
        stat_prefix="metrics",
        codec_type="AUTO",
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="REJECT_REQUEST",
        request_headers_timeout="10s",
        route_config={
            "name": "metrics",
            "virtual_hosts": [{"name": "metrics", "domains": ["*"], "routes": routes}],
        },
        http_filters=[router()],
    )
    return {
        "name": "metrics",
        "address": {"socket_address": {"address": settings.metrics_host, "port_value": port}},
        "filter_chains": [{"filters": [hcm]}],
    }


def admin_cluster(settings: GatewaySettings) -> dict[str, Any]:
    """The loopback admin interface, as the metrics listener's upstream."""
    host = "127.0.0.1" if settings.admin_host == "localhost" else settings.admin_host
    return {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": seconds(settings.connect_timeout_s),
        "load_assignment": load_assignment(ADMIN_CLUSTER, [(host, settings.admin_port)]),
    }
