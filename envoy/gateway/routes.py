"""The public listener's routes: one per method of the API (from the descriptor set), the files Envoy
serves itself (the OpenAPI document, the web page), and the 404 and 405 answers for everything else.

The paths the gateway serves of its own are named here and nowhere else: `OPENAPI_PATH`, the web page's
files (`WEB_FILES`) and the private prefixes (`PRIVATE_PREFIXES`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatmesh.common.loopback import PEER_ADDRESS_HEADER
from gateway.api import DEV_SIGN_IN_SERVICE, Method, ServiceApi
from gateway.clusters import CHAT_CLUSTER, COMPLETIONS_CLUSTER
from gateway.envoy_json import seconds, set_header, typed
from gateway.filters import loopback_only, rate_limit_per_route
from gateway.settings import GatewaySettings

OPENAPI_PATH = "/openapi.json"
_MAX_DIRECT_RESPONSE_BYTES = 1024 * 1024

WEB_DIRECTORY = Path(__file__).resolve().parent / "web"
"""The chat web page: static files, served by Envoy itself (no server of their own)."""

WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
"""The web page's paths: (file in `WEB_DIRECTORY`, content type)."""

WEB_SECURITY_HEADERS = {
    # Model output is untrusted: no inline script or style, no plug-ins, nothing from elsewhere. The page
    # builds the DOM from text and never parses a reply as HTML; this is the second line.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

PRIVATE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Health and reflection stay private: Envoy health-checks the replicas directly, and a public health
endpoint of one replica behind a load balancer says nothing useful. gRPC callers get UNIMPLEMENTED, REST
callers 404."""

# Streaming calls: retry when the request certainly never reached a replica (connection refused or
# failed, HTTP/2 REFUSED_STREAM, reset before sending), or when a replica refused it as
# RESOURCE_EXHAUSTED (its engine is full): that status comes as a trailers-only response before any
# byte of the answer, and the retry carries the same x-request-id, which the chat service takes as
# the request id, so the other replica continues the stored question instead of storing it twice.
# A reset or timeout later may mean a replica is already generating; Envoy never retries once
# response headers have been forwarded anyway. No overall limit but completion_timeout_s (in
# _method_route): a reply streams for as long as the model generates (stream_idle_timeout_s cuts a
# stream gone quiet).
_STREAMING_RETRY_ON = "connect-failure,refused-stream,reset-before-request,resource-exhausted"
# Unary calls (reads, updates, deletes) are idempotent: any reset or UNAVAILABLE may go to another
# replica. (A retried delete that had in fact succeeded answers NOT_FOUND, which the chat now is.)
_UNARY_RETRY_ON = "connect-failure,refused-stream,reset,unavailable"


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
                "typed_config": typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
            }
        ],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.250s"},
    }
    if per_try_timeout_s is not None:
        policy["per_try_timeout"] = seconds(per_try_timeout_s)
    return policy


def _method_route(settings: GatewaySettings, method: Method) -> dict[str, Any]:
    """The exact route of one method: every call the service has is rate-limited per user, and a gRPC
    call to a method it does not have never reaches a replica (the 404 below, which gRPC clients see as
    UNIMPLEMENTED)."""
    if method.streaming:
        limit = seconds(settings.completion_timeout_s)
        retry_policy = _retry_policy(_STREAMING_RETRY_ON, settings, None)
    else:
        limit = seconds(settings.unary_timeout_s)
        attempts = settings.max_retries + 1
        retry_policy = _retry_policy(_UNARY_RETRY_ON, settings, settings.unary_timeout_s / attempts)
    entry: dict[str, Any] = {
        "name": method.grpc_path,
        "match": {"path": method.grpc_path, "grpc": {}},
        "route": {
            "cluster": COMPLETIONS_CLUSTER
            if method.streaming and settings.max_active_completions
            else CHAT_CLUSTER,
            # The whole call's limit (0: none), as the stream's duration rather than the route's
            # `timeout`: Envoy ignores `timeout` on a route with a max_stream_duration, which is what
            # lets a gRPC client's own shorter deadline (grpc-timeout) apply, and a call past it
            # ends DEADLINE_EXCEEDED (REST: 504) where a route timeout says UNAVAILABLE, which
            # invites a retry.
            "max_stream_duration": {"max_stream_duration": limit, "grpc_timeout_header_max": limit},
            "retry_policy": retry_policy,
        },
    }
    filter_config: dict[str, Any] = {}
    if settings.rate_limit_per_s > 0:
        filter_config["envoy.filters.http.local_ratelimit"] = rate_limit_per_route(settings)
    if method.service == DEV_SIGN_IN_SERVICE:
        # Tokens without a password: for this machine only, whatever interface Envoy listens on; the
        # replica checks the peer's address again (chat_service/dev_sign_in.py).
        filter_config["envoy.filters.http.rbac"] = loopback_only()
        entry["request_headers_to_add"] = [
            set_header(PEER_ADDRESS_HEADER, "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%")
        ]
    if filter_config:
        entry["typed_per_filter_config"] = filter_config
    return entry


def _openapi_route(openapi_path: Path) -> list[dict[str, Any]]:
    """`GET /openapi.json`: the REST API's OpenAPI document (no token needed), if there is one."""
    if not openapi_path.is_file():
        return []
    return [
        {
            "name": "openapi",
            "match": {"path": OPENAPI_PATH},
            "direct_response": {"status": 200, "body": {"filename": str(openapi_path)}},
            "response_headers_to_add": [set_header("content-type", "application/json")],
        }
    ]


def _web_routes() -> list[dict[str, Any]]:
    """The web page's files at `/`, `/app.js`, ... (no token needed: the page signs in itself)."""
    return [
        {
            "name": f"web {path}",
            "match": {
                "path": path,
                "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": "^(GET|HEAD)$"}}}],
            },
            "direct_response": {"status": 200, "body": {"filename": str(WEB_DIRECTORY / name)}},
            "response_headers_to_add": [
                set_header(key, value)
                for key, value in {"content-type": content_type, **WEB_SECURITY_HEADERS}.items()
            ],
        }
        for path, (name, content_type) in WEB_FILES.items()
    ]


def _method_not_allowed(api: ServiceApi) -> list[dict[str, Any]]:
    """405 for a REST path called with a verb it does not have. The transcoder rewrites every request it
    maps (path and method) before routing, so a request still on a REST path here used such a verb."""
    routes = []
    for path in api.rest_paths():
        allowed = ", ".join(path.verbs)
        routes.append(
            {
                "name": f"method-not-allowed {path.template}",
                "match": {"safe_regex": {"regex": path.path_regex}},
                "direct_response": {
                    "status": 405,
                    "body": {"inline_string": f"method not allowed; {path.template} takes {allowed}"},
                },
                "response_headers_to_add": [set_header("allow", allowed)],
            }
        )
    return routes


def route_config(settings: GatewaySettings, api: ServiceApi, openapi_path: Path) -> dict[str, Any]:
    """The public listener's route table, first match wins."""
    not_found = f"no such endpoint; the API is {api.endpoint_summary()}"
    private = [
        {
            "match": {"prefix": prefix},
            "direct_response": {"status": 404, "body": {"inline_string": not_found}},
        }
        for prefix in PRIVATE_PREFIXES
    ]
    fallback = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": not_found}},
    }
    return {
        "name": "public",
        # The OpenAPI document is larger than a direct response's default limit (4 KiB).
        "max_direct_response_body_size_bytes": _MAX_DIRECT_RESPONSE_BYTES,
        "virtual_hosts": [
            {
                "name": "chatmesh",
                "domains": ["*"],
                "routes": [
                    *(_method_route(settings, method) for method in api.methods),
                    *_openapi_route(openapi_path),
                    *(_web_routes() if settings.web_page else []),
                    *private,
                    *_method_not_allowed(api),
                    fallback,
                ],
            }
        ],
    }
