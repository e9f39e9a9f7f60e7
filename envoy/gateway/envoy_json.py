"""The small shapes every part of the Envoy config is built from, as JSON data: typed extension configs,
durations, header values, static endpoints."""

from __future__ import annotations

import ipaddress
from typing import Any


def typed(type_name: str, **fields: Any) -> dict[str, Any]:
    """A typed extension config (`typed_config` and the like): `@type` plus the message's fields."""
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def seconds(value: float) -> str:
    """A protobuf Duration in JSON form."""
    return f"{value:.3f}s"


def set_header(key: str, value: str) -> dict[str, Any]:
    """A header to add to a request or reply, replacing any the client or upstream sent."""
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def is_ip(host: str) -> bool:
    """Whether `host` is an IP address (else a name Envoy must resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def load_assignment(cluster: str, endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """A cluster's endpoints, one locality, by (host, port)."""
    return {
        "cluster_name": cluster,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    for host, port in endpoints
                ]
            }
        ],
    }


def http_connection_manager(**fields: Any) -> dict[str, Any]:
    """A listener's one network filter: the HTTP connection manager with `fields`."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", **fields
        ),
    }


def router() -> dict[str, Any]:
    """The last HTTP filter of every chain: routes the request."""
    return {
        "name": "envoy.filters.http.router",
        "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
    }
