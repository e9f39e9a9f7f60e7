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

Routes, the 404/405 answers and which calls stream all come from the descriptor set (see `api.py`);
nothing here names a method or a REST path. The config is built as data and written as JSON (a subset
of YAML, which Envoy reads by extension), so nothing needs escaping and every value comes from
typed settings.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatmesh.common.auth import JwtKeys
from chatmesh.common.errors import OPENAI_ERROR_TYPES
from chatmesh.common.loopback import PEER_ADDRESS_HEADER
from gateway.api import (
    CHAT_SERVICE,
    DEV_SIGN_IN_SERVICE,
    PUBLIC_SERVICES,
    Method,
    ServiceApi,
    default_descriptor_path,
)
from gateway.settings import GatewaySettings, split_host_port

USER_HEADER = "x-chatmesh-user"
"""Request header carrying the verified token subject, for the per-user rate limit. jwt_authn strips any
client-supplied copy before setting it."""

# The canonical gRPC code (as google.rpc.Code names it, the vocabulary of the `error` events of a
# stream) for each HTTP status Envoy answers by itself, so that every REST error body has one shape:
# {"code": "<NAME>", "message": ...}.
LOCAL_REPLY_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,  # unparseable JSON, unknown field or query parameter
    401: grpc.StatusCode.UNAUTHENTICATED,  # jwt_authn
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,  # no such path
    405: grpc.StatusCode.UNIMPLEMENTED,  # known path, wrong method
    408: grpc.StatusCode.DEADLINE_EXCEEDED,  # request headers too slow
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # body too large
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # rate limit
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,  # headers too large
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,  # no healthy replica, connect failure, reset
    504: grpc.StatusCode.DEADLINE_EXCEEDED,  # route timeout
}
UNKNOWN_CODE = grpc.StatusCode.UNKNOWN


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


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwks(keys: JwtKeys) -> dict[str, Any]:
    """The JSON Web Key Set that lets `jwt_authn` verify what `keys` verifies.

    HS256: the shared secret as an `oct` key. RS256: the public key's modulus and exponent (RFC 7518
    §6.3.1, base64url big-endian); `ValueError` if the PEM is not an RSA public key.
    """
    if keys.algorithm == "HS256":
        secret = base64.urlsafe_b64encode(keys.verify_key.encode()).rstrip(b"=").decode()
        return {"keys": [{"kty": "oct", "alg": "HS256", "k": secret}]}
    if keys.algorithm == "RS256":
        try:
            public_key = serialization.load_pem_public_key(keys.verify_key.encode())
        except ValueError as exc:
            raise ValueError(
                f"the JWT public key is not a PEM public key ({exc}); create a key pair with"
                " `chatmesh keygen`"
            ) from exc
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise ValueError(
                "the JWT public key must be an RSA key for RS256; create one with `chatmesh keygen`"
            )
        numbers = public_key.public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "alg": "RS256",
                    "use": "sig",
                    "n": _b64url_uint(numbers.n),
                    "e": _b64url_uint(numbers.e),
                }
            ]
        }
    raise ValueError(f"the gateway cannot check {keys.algorithm} tokens; use HS256 or RS256")


COMPLETIONS_CLUSTER = "chat_completions"
"""The chat replicas again, for the streaming routes alone, when `max_active_completions` caps them."""

_OVERFLOW_MESSAGE = "too many completions are in progress; retry after the time in retry-after-ms"

DEV_SIGN_IN_REFUSED_MESSAGE = (
    "the dev sign-in (a token for any user name, no password) answers callers on the gateway's own machine"
    " only; sign in with a token from the mesh's operator or identity provider"
)

LOOPBACK_PREFIXES = (("127.0.0.0", 8), ("::1", 128), ("::ffff:127.0.0.0", 104))
"""The peers the dev sign-in answers: this machine, by the connection's own address (never a header)."""


def _loopback_only() -> dict[str, Any]:
    """Per-route RBAC that lets only loopback peers through. `direct_remote_ip` is the address of the TCP
    connection itself, which no client can choose, unlike X-Forwarded-For or x-envoy-external-address."""
    return _typed(
        "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        rbac={
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "loopback-peers": {
                        "permissions": [{"any": True}],
                        "principals": [
                            {"direct_remote_ip": {"address_prefix": prefix, "prefix_len": length}}
                            for prefix, length in LOOPBACK_PREFIXES
                        ],
                    }
                },
            }
        },
    )


def _local_reply_config(settings: GatewaySettings) -> dict[str, Any]:
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

    def json_body(code: grpc.StatusCode) -> dict[str, Any]:
        return {
            "json_format": {"code": code.name, "message": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        }

    # A request refused by a circuit breaker (response flag UO, "upstream overflow"): the gateway is full,
    # which is RESOURCE_EXHAUSTED with a retry hint, not the 503 Envoy would say.
    overflow = {"response_flag_filter": {"flags": ["UO"]}}
    retry_after_ms = str(round(settings.completion_retry_after_s * 1000))
    overflow_headers = [
        {
            "header": {"key": "retry-after-ms", "value": retry_after_ms},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        },
        {
            "header": {"key": "retry-after", "value": str(max(1, round(settings.completion_retry_after_s)))},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        },
    ]
    # The dev sign-in refused by its route's RBAC policy (a caller not on this machine): say why.
    dev_sign_in_refused = {
        "and_filter": {
            "filters": [
                {
                    "status_code_filter": {
                        "comparison": {"op": "EQ", "value": {"default_value": 403, "runtime_key": "lr_403"}}
                    }
                },
                {
                    "header_filter": {
                        "header": {
                            "name": ":path",
                            "string_match": {"prefix": f"/{DEV_SIGN_IN_SERVICE}/"},
                        }
                    }
                },
            ]
        }
    }
    mappers: list[dict[str, Any]] = []
    if settings.dev_sign_in:
        mappers += [
            {
                "filter": {"and_filter": {"filters": [rest, dev_sign_in_refused]}},
                "body": {"inline_string": DEV_SIGN_IN_REFUSED_MESSAGE},
                "body_format_override": json_body(grpc.StatusCode.PERMISSION_DENIED),
            },
            {"filter": dev_sign_in_refused, "body": {"inline_string": DEV_SIGN_IN_REFUSED_MESSAGE}},
        ]
    mappers += [
        {
            # A successful direct response (the OpenAPI document) is not an error: its body as it is.
            "filter": _status_is(200),
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        },
        {
            "filter": {"and_filter": {"filters": [rest, overflow]}},
            "status_code": 429,
            "headers_to_add": overflow_headers,
            "body": {"inline_string": _OVERFLOW_MESSAGE},
            "body_format_override": json_body(grpc.StatusCode.RESOURCE_EXHAUSTED),
        },
        {
            "filter": overflow,
            "status_code": 429,
            "headers_to_add": [
                *overflow_headers,
                # gRPC clients read the status from here (429 alone would read as UNAVAILABLE).
                {
                    "header": {
                        "key": "grpc-status",
                        "value": str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]),
                    },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
                {
                    "header": {"key": "grpc-message", "value": _OVERFLOW_MESSAGE},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
            ],
        },
    ]
    # A body over max_request_bytes (the buffer filter or the transcoder): the same words for every
    # protocol, and RESOURCE_EXHAUSTED for gRPC clients, as gRPC itself says for an oversized message
    # (413 alone would read as UNKNOWN).
    too_large = _status_is(413)
    too_large_message = {
        "inline_string": f"the request is too large: this gateway takes at most {settings.max_request_bytes}"
        " bytes of request body"
    }
    mappers.append(
        {
            "filter": {"and_filter": {"filters": [rest, too_large]}},
            "body": too_large_message,
            "body_format_override": json_body(grpc.StatusCode.RESOURCE_EXHAUSTED),
        }
    )
    mappers += [
        {
            "filter": {"and_filter": {"filters": [rest, _status_is(status)]}},
            "body_format_override": json_body(code),
        }
        for status, code in LOCAL_REPLY_CODES.items()
    ]
    mappers.append({"filter": rest, "body_format_override": json_body(UNKNOWN_CODE)})
    mappers.append(
        {
            "filter": too_large,
            "body": too_large_message,
            "headers_to_add": [
                {
                    "header": {
                        "key": "grpc-status",
                        "value": str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]),
                    },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    )
    return {"mappers": mappers}


def _status_is(status: int) -> dict[str, Any]:
    """An access-log filter matching a reply of HTTP `status`."""
    return {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": status, "runtime_key": f"lr_{status}"}}
        }
    }


def _rest_error_code_names_lua() -> str:
    """Lua for the one REST error vocabulary: a gRPC error the transcoder turns into a REST reply
    (`convert_grpc_status`, which keeps the status details) is a google.rpc.Status whose `code` is
    its number; this renames it, so that every REST error says `"code": "NOT_FOUND"` like Envoy's own
    replies (`LOCAL_REPLY_CODES`) and the `error` event of a stream do.

    Only non-200 JSON replies are touched (a transcoded error); successes and native gRPC replies,
    whose HTTP status is always 200, pass straight through without their body being buffered.

    One success changes status: a job submission over REST (`POST /chat/{chat_id}/jobs`) answers 202
    Accepted, as asynchronous work does; the transcoder itself can only say 200.

    Errors of the OpenAI-compatible API (`/v1/...`), the gateway's own included (401, 429, a body the
    transcoder cannot read, 413), take OpenAI's shape instead: `{"error": {"message", "type", "param",
    "code"}}`, `param` the field a BadRequest detail names, `code` the status name in lower case; a 413
    is an `invalid_request_error`, as OpenAI calls a request too large."""
    names = ", ".join(f'[{code.value[0]}] = "{code.name}"' for code in grpc.StatusCode)
    types = ", ".join(f'{code.name} = "{kind}"' for code, kind in OPENAI_ERROR_TYPES.items())
    return f"""local NAMES = {{{names}}}
local OPENAI_TYPES = {{{types}}}
local PREFIX = '{{"code":'

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(":path") or ""
  if headers:get(":method") == "POST" and string.match(path, "^/chat/[^/?]+/jobs/?$") then
    handle:streamInfo():dynamicMetadata():set("chatmesh", "accepted", "1")
  end
  if string.sub(path, 1, 4) == "/v1/" then
    handle:streamInfo():dynamicMetadata():set("chatmesh", "openai", "1")
  end
end

-- The JSON string literal starting at `first` (its opening quote), escapes kept, or nil.
local function json_string(text, first)
  local i = first + 1
  while i <= #text do
    local byte = string.byte(text, i)
    if byte == 92 then
      i = i + 2
    elseif byte == 34 then
      return string.sub(text, first, i)
    else
      i = i + 1
    end
  end
  return nil
end

-- A REST error body ({{"code": 3 or "NAME", "message": ...}}) of HTTP `status` in OpenAI's shape, or nil.
local function openai_error(text, status)
  local digits = string.match(text, "^" .. PREFIX .. "(%d+)")
  local name = (digits and NAMES[tonumber(digits)]) or string.match(text, "^" .. PREFIX .. '"([A-Z_]+)"')
  if not name then
    return nil
  end
  local at = string.find(text, '"message":"', 1, true)
  local message = at and json_string(text, at + 10) or '""'
  local field = string.match(text, '"field":"([%w_%.%[%]]*)"')
  local param = field and ('"' .. field .. '"') or "null"
  -- A body over the size limit is the request's fault, not a rate limit (RESOURCE_EXHAUSTED otherwise).
  local kind = (status == "413" and "invalid_request_error") or OPENAI_TYPES[name] or "server_error"
  return '{{"error":{{"message":' .. message .. ',"type":"' .. kind
    .. '","param":' .. param .. ',"code":"' .. string.lower(name) .. '"}}}}'
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local marks = handle:streamInfo():dynamicMetadata():get("chatmesh")
  -- Read before the body: the headers cannot be read once the script has waited for it.
  local status = headers:get(":status")
  if status == "200" then
    if marks ~= nil and marks["accepted"] ~= nil then
      headers:replace(":status", "202")
    end
    return
  end
  if headers:get("content-type") ~= "application/json" then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  if marks ~= nil and marks["openai"] ~= nil then
    local rewritten = openai_error(text, status)
    if rewritten then
      body:setBytes(rewritten)
    end
    return
  end
  local digits = string.match(text, "^" .. PREFIX .. "(%d+)")
  local name = digits and NAMES[tonumber(digits)]
  if name then
    body:setBytes(PREFIX .. '"' .. name .. '"' .. string.sub(text, #PREFIX + #digits + 1))
  end
end
"""


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


def _chat_routes(settings: GatewaySettings, api: ServiceApi) -> list[dict[str, Any]]:
    # One exact route per method of the descriptor: every call the service has is rate-limited per
    # user, and a gRPC call to a method it does not have never reaches a replica (404 below, which
    # gRPC clients see as UNIMPLEMENTED).
    per_route: dict[str, Any] = (
        {"envoy.filters.http.local_ratelimit": _rate_limit_per_route(settings)}
        if settings.rate_limit_per_s > 0
        else {}
    )
    # Streaming calls: retry when the request certainly never reached a replica (connection refused or
    # failed, HTTP/2 REFUSED_STREAM, reset before sending), or when a replica refused it as
    # RESOURCE_EXHAUSTED (its engine is full): that status comes as a trailers-only response before any
    # byte of the answer, and the retry carries the same x-request-id, which the chat service takes as
    # the request id, so the other replica continues the stored question instead of storing it twice.
    # A reset or timeout later may mean a replica is already generating; Envoy never retries once
    # response headers have been forwarded anyway. No overall limit but completion_timeout_s (in route()
    # below): a reply streams for as long as the model generates (stream_idle_timeout_s cuts a stream gone
    # quiet).
    streaming_action = {
        "retry_policy": _retry_policy(
            "connect-failure,refused-stream,reset-before-request,resource-exhausted", settings, None
        ),
    }
    # Unary calls (reads, updates, deletes) are idempotent: any reset or UNAVAILABLE may go to another
    # replica. (A retried delete that had in fact succeeded answers NOT_FOUND, which the chat now is.)
    attempts = settings.max_retries + 1
    unary_action = {
        "retry_policy": _retry_policy(
            "connect-failure,refused-stream,reset,unavailable",
            settings,
            settings.unary_timeout_s / attempts,
        ),
    }

    def route(method: Method) -> dict[str, Any]:
        limit = _seconds(settings.completion_timeout_s if method.streaming else settings.unary_timeout_s)
        entry: dict[str, Any] = {
            "name": method.grpc_path,
            "match": {"path": method.grpc_path, "grpc": {}},
            "route": {
                "cluster": COMPLETIONS_CLUSTER
                if method.streaming and settings.max_active_completions
                else "chat",
                # The whole call's limit (0: none), as the stream's duration rather than the route's
                # `timeout`: Envoy ignores `timeout` on a route with a max_stream_duration, which is what
                # lets a gRPC client's own shorter deadline (grpc-timeout) apply, and a call past it
                # ends DEADLINE_EXCEEDED (REST: 504) where a route timeout says UNAVAILABLE, which
                # invites a retry.
                "max_stream_duration": {"max_stream_duration": limit, "grpc_timeout_header_max": limit},
                **(streaming_action if method.streaming else unary_action),
            },
        }
        filter_config = dict(per_route)
        if method.service == DEV_SIGN_IN_SERVICE:
            # Tokens without a password: for this machine only, whatever interface Envoy listens on; the
            # replica checks the peer's address again (chat_service/dev_sign_in.py).
            filter_config["envoy.filters.http.rbac"] = _loopback_only()
            entry["request_headers_to_add"] = [
                {
                    "header": {
                        "key": PEER_ADDRESS_HEADER,
                        "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
                    },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        if filter_config:
            entry["typed_per_filter_config"] = filter_config
        return entry

    return [route(method) for method in api.methods]


OPENAPI_PATH = "/openapi.json"
_MAX_DIRECT_RESPONSE_BYTES = 1024 * 1024


def _openapi_route(openapi_path: Path) -> list[dict[str, Any]]:
    """`GET /openapi.json`: the REST API's OpenAPI document (no token needed), if there is one."""
    if not openapi_path.is_file():
        return []
    return [
        {
            "name": "openapi",
            "match": {"path": OPENAPI_PATH},
            "direct_response": {"status": 200, "body": {"filename": str(openapi_path)}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    ]


WEB_DIRECTORY = Path(__file__).resolve().parent / "web"
"""The chat web page: static files, served by Envoy itself (no server of their own)."""

_WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

WEB_SECURITY_HEADERS = {
    # Model output is untrusted: no inline script or style, no plug-ins, nothing from elsewhere. The page
    # builds the DOM from text and never parses a reply as HTML; this is the second line.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


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
                {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for key, value in {"content-type": content_type, **WEB_SECURITY_HEADERS}.items()
            ],
        }
        for path, (name, content_type) in _WEB_FILES.items()
    ]


def _route_config(settings: GatewaySettings, api: ServiceApi, openapi_path: Path) -> dict[str, Any]:
    not_found = f"no such endpoint; the API is {api.endpoint_summary()}"
    # Health and reflection stay private: Envoy health-checks the replicas directly, and a public
    # health endpoint of one replica behind a load balancer says nothing useful. gRPC callers get
    # UNIMPLEMENTED, REST callers 404.
    private = [
        {
            "match": {"prefix": prefix},
            "direct_response": {"status": 404, "body": {"inline_string": not_found}},
        }
        for prefix in ("/grpc.health.v1.Health/", "/grpc.reflection.")
    ]
    # The transcoder rewrites every request it maps (path and method) before routing, so a request
    # still on a REST path here used a verb that path does not have.
    wrong_method = []
    for path in api.rest_paths():
        allowed = ", ".join(path.verbs)
        wrong_method.append(
            {
                "name": f"method-not-allowed {path.template}",
                "match": {"safe_regex": {"regex": path.path_regex}},
                "direct_response": {
                    "status": 405,
                    "body": {"inline_string": f"method not allowed; {path.template} takes {allowed}"},
                },
                "response_headers_to_add": [
                    {
                        "header": {"key": "allow", "value": allowed},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            }
        )
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
                    *_chat_routes(settings, api),
                    *_openapi_route(openapi_path),
                    *(_web_routes() if settings.web_page else []),
                    *private,
                    *wrong_method,
                    fallback,
                ],
            }
        ],
    }


def _http_filters(settings: GatewaySettings, api: ServiceApi, descriptor_path: Path) -> list[dict[str, Any]]:
    provider: dict[str, Any] = {
        "local_jwks": {"inline_string": json.dumps(jwks(settings.jwt_keys()))},
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
            # Before the transcoder, so that it sees the transcoder's responses (encoding runs in
            # reverse order): see _rest_error_code_names_lua.
            "name": "envoy.filters.http.lua",
            "typed_config": _typed(
                "envoy.extensions.filters.http.lua.v3.Lua",
                default_source_code={"inline_string": _rest_error_code_names_lua()},
            ),
        },
        {
            # The request size limit, for every protocol: the body as the client sent it (JSON, or gRPC
            # frames, which no other filter bounds) is held here whole, and one byte over the limit is
            # refused (413; RESOURCE_EXHAUSTED for gRPC, see _local_reply_config) before the token is
            # even checked, so no replica ever reads it. Every call sends its one request message at
            # once (no method streams requests), so holding it costs no latency worth counting.
            "name": "envoy.filters.http.buffer",
            "typed_config": _typed(
                "envoy.extensions.filters.http.buffer.v3.Buffer",
                max_request_bytes=settings.max_request_bytes,
            ),
        },
        {
            # The first filter to change a request, so that everything after it (JWT rules, rate limit,
            # routes) sees one path space: REST requests rewritten to /<package>.<Service>/<Method>;
            # gRPC passes through.
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": _typed(
                "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                proto_descriptor=str(descriptor_path),
                services=list(api.services),
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
                max_request_body_size=settings.max_request_bytes,
            ),
        },
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": _typed(
                "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                providers={"chatmesh": provider},
                rules=[
                    {"match": {"prefix": prefix}, "requires": {"provider_name": "chatmesh"}}
                    for prefix in api.grpc_prefixes
                    # Signing in is how a token is had.
                    if prefix != f"/{DEV_SIGN_IN_SERVICE}/"
                ],
            ),
        },
    ]
    if settings.dev_sign_in:
        filters.append(
            {
                # No rules here: only the dev sign-in's routes carry a policy (_loopback_only).
                "name": "envoy.filters.http.rbac",
                "typed_config": _typed("envoy.extensions.filters.http.rbac.v3.RBAC"),
            }
        )
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


def _chat_cluster(settings: GatewaySettings, api: ServiceApi) -> dict[str, Any]:
    endpoints = [split_host_port(address) for address in settings.chat_addresses]
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
                # One process serves every public service: its ChatService status stands for all.
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


def _clusters(settings: GatewaySettings, api: ServiceApi) -> list[dict[str, Any]]:
    """The chat replicas; with `max_active_completions`, a second cluster of the same replicas for the
    completions, whose circuit breaker admits that many at once (a breaker counts per cluster, so the
    cap leaves the short calls alone)."""
    chat = _chat_cluster(settings, api)
    if not settings.max_active_completions:
        return [chat]
    cap = settings.max_active_completions
    completions = copy.deepcopy(chat)
    completions["name"] = COMPLETIONS_CLUSTER
    completions["load_assignment"]["cluster_name"] = COMPLETIONS_CLUSTER
    completions["circuit_breakers"]["thresholds"][0].update(max_requests=cap, max_pending_requests=cap)
    return [chat, completions]


TRACES_CLUSTER = "otlp_collector"


def _tracing(settings: GatewaySettings) -> dict[str, Any]:
    """Envoy's OpenTelemetry tracer: a span for each request (continuing the caller's W3C `traceparent`,
    or starting a trace) and one for each upstream attempt, whose context goes to the chat replica."""
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": TRACES_CLUSTER}, "timeout": "1s"},
                service_name="chatmesh-gateway",
            ),
        },
        "spawn_upstream_span": True,
    }


def _traces_cluster(endpoint: str, settings: GatewaySettings) -> dict[str, Any]:
    host, port = split_host_port(endpoint)
    return {
        "name": TRACES_CLUSTER,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": _seconds(settings.connect_timeout_s),
        "load_assignment": {
            "cluster_name": TRACES_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
    }


ADMIN_CLUSTER = "envoy_admin"
METRICS_PATHS = ("/stats/prometheus", "/ready")
"""What the metrics listener serves of the admin interface: the Prometheus metrics, and readiness for
probes. Nothing else of the admin (/config_dump, /quitquitquit, /logging, ...) is reachable there."""


def _metrics_listener(settings: GatewaySettings, port: int) -> dict[str, Any]:
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
    hcm = {
        "stat_prefix": "metrics",
        "codec_type": "AUTO",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "request_headers_timeout": "10s",
        "route_config": {
            "name": "metrics",
            "virtual_hosts": [{"name": "metrics", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
            }
        ],
    }
    return {
        "name": "metrics",
        "address": {"socket_address": {"address": settings.metrics_host, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": _typed(
                            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            **hcm,
                        ),
                    }
                ]
            }
        ],
    }


def _admin_cluster(settings: GatewaySettings) -> dict[str, Any]:
    host = "127.0.0.1" if settings.admin_host == "localhost" else settings.admin_host
    return {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": _seconds(settings.connect_timeout_s),
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": host, "port_value": settings.admin_port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def descriptor_path_for(settings: GatewaySettings, descriptor_path: Path | None = None) -> Path:
    """The descriptor set to transcode with: the argument, else the setting, else the packaged one."""
    return (descriptor_path or settings.descriptor_path or default_descriptor_path()).resolve()


def build_envoy_config(settings: GatewaySettings, descriptor_path: Path | None = None) -> dict[str, Any]:
    """The Envoy bootstrap for `settings` as a dictionary (see `render_envoy_config`)."""
    descriptor_path = descriptor_path_for(settings, descriptor_path)
    services = PUBLIC_SERVICES + ((DEV_SIGN_IN_SERVICE,) if settings.dev_sign_in else ())
    api = ServiceApi.load(descriptor_path, services)
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
        "local_reply_config": _local_reply_config(settings),
        # The OpenAPI document is written next to the descriptor set by `make protos`.
        "route_config": _route_config(settings, api, descriptor_path.parent / "openapi.json"),
        "http_filters": _http_filters(settings, api, descriptor_path),
    }
    clusters = _clusters(settings, api)
    if settings.otlp_endpoint:
        hcm["tracing"] = _tracing(settings)
        clusters.append(_traces_cluster(settings.otlp_endpoint, settings))
    if settings.access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": _typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"),
            }
        ]
    listeners: list[dict[str, Any]] = []
    if settings.metrics_port is not None:
        listeners.append(_metrics_listener(settings, settings.metrics_port))
        clusters.append(_admin_cluster(settings))
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
                },
                *listeners,
            ],
            "clusters": clusters,
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
    descriptor set (default: `settings.descriptor_path`, else the one shipped in this package)."""
    return json.dumps(build_envoy_config(settings, descriptor_path), indent=2) + "\n"
