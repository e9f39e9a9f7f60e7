"""The answers Envoy gives by itself (no route, no token, rate limit, body too large, a full gateway, the
dev sign-in refused), in the API's error shapes: REST clients get `{"code": "<NAME>", "message": ...}`
with the canonical gRPC code name (the vocabulary of a stream's `error` events), gRPC clients keep a gRPC
status (grpc-status/grpc-message)."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.api import DEV_SIGN_IN_SERVICE
from gateway.envoy_json import set_header
from gateway.settings import GatewaySettings

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

OVERFLOW_MESSAGE = "too many completions are in progress; retry after the time in retry-after-ms"

DEV_SIGN_IN_REFUSED_MESSAGE = (
    "the dev sign-in (a token for any user name, no password) answers callers on the gateway's own machine"
    " only; sign in with a token from the mesh's operator or identity provider"
)


def _rest() -> dict[str, Any]:
    """An access-log filter matching REST requests only: a gRPC client's local replies must stay gRPC
    (grpc-status/grpc-message), not JSON. A transcoded request has a gRPC content type by now, but
    carries x-envoy-original-path."""
    return {
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


def _rest_and(condition: dict[str, Any]) -> dict[str, Any]:
    return {"and_filter": {"filters": [_rest(), condition]}}


def _overflowed() -> dict[str, Any]:
    """A request refused by a circuit breaker (response flag UO, "upstream overflow"): the gateway is
    full, which is RESOURCE_EXHAUSTED with a retry hint, not the 503 Envoy would say."""
    return {"response_flag_filter": {"flags": ["UO"]}}


def _status_is(status: int) -> dict[str, Any]:
    """An access-log filter matching a reply of HTTP `status`."""
    return {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": status, "runtime_key": f"lr_{status}"}}
        }
    }


def _json_body(code: grpc.StatusCode) -> dict[str, Any]:
    return {
        "json_format": {"code": code.name, "message": "%LOCAL_REPLY_BODY%"},
        "content_type": "application/json",
    }


def _grpc_status(code: grpc.StatusCode) -> dict[str, Any]:
    return set_header("grpc-status", str(code.value[0]))


def _dev_sign_in_refused() -> list[dict[str, Any]]:
    """The dev sign-in refused by its route's RBAC policy (a caller not on this machine): say why."""

    def refused() -> dict[str, Any]:
        path = {"name": ":path", "string_match": {"prefix": f"/{DEV_SIGN_IN_SERVICE}/"}}
        return {"and_filter": {"filters": [_status_is(403), {"header_filter": {"header": path}}]}}

    return [
        {
            "filter": _rest_and(refused()),
            "body": {"inline_string": DEV_SIGN_IN_REFUSED_MESSAGE},
            "body_format_override": _json_body(grpc.StatusCode.PERMISSION_DENIED),
        },
        {"filter": refused(), "body": {"inline_string": DEV_SIGN_IN_REFUSED_MESSAGE}},
    ]


def _overflow(settings: GatewaySettings) -> list[dict[str, Any]]:
    """A completion refused by the completions cluster's circuit breaker: 429 with a retry hint."""
    retry_after_s = settings.completion_retry_after_s
    headers = [
        set_header("retry-after-ms", str(round(retry_after_s * 1000))),
        set_header("retry-after", str(max(1, round(retry_after_s)))),
    ]
    return [
        {
            "filter": _rest_and(_overflowed()),
            "status_code": 429,
            "headers_to_add": headers,
            "body": {"inline_string": OVERFLOW_MESSAGE},
            "body_format_override": _json_body(grpc.StatusCode.RESOURCE_EXHAUSTED),
        },
        {
            "filter": _overflowed(),
            "status_code": 429,
            "headers_to_add": [
                *headers,
                # gRPC clients read the status from here (429 alone would read as UNAVAILABLE).
                _grpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED),
                set_header("grpc-message", OVERFLOW_MESSAGE),
            ],
        },
    ]


def _too_large_message(settings: GatewaySettings) -> dict[str, Any]:
    return {
        "inline_string": f"the request is too large: this gateway takes at most {settings.max_request_bytes}"
        " bytes of request body"
    }


def local_reply_config(settings: GatewaySettings) -> dict[str, Any]:
    """The connection manager's `local_reply_config`: its mappers, tried in order, the first that
    matches rewriting the reply."""
    # A body over max_request_bytes (the buffer filter or the transcoder): the same words for every
    # protocol, and RESOURCE_EXHAUSTED for gRPC clients, as gRPC itself says for an oversized message
    # (413 alone would read as UNKNOWN).
    too_large = _status_is(413)
    mappers: list[dict[str, Any]] = _dev_sign_in_refused() if settings.dev_sign_in else []
    mappers += [
        {
            # A successful direct response (the OpenAPI document) is not an error: its body as it is.
            "filter": _status_is(200),
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        },
        *_overflow(settings),
        {
            "filter": _rest_and(too_large),
            "body": _too_large_message(settings),
            "body_format_override": _json_body(grpc.StatusCode.RESOURCE_EXHAUSTED),
        },
        *(
            {"filter": _rest_and(_status_is(status)), "body_format_override": _json_body(code)}
            for status, code in LOCAL_REPLY_CODES.items()
        ),
        {"filter": _rest(), "body_format_override": _json_body(UNKNOWN_CODE)},
        {
            "filter": too_large,
            "body": _too_large_message(settings),
            "headers_to_add": [_grpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED)],
        },
    ]
    return {"mappers": mappers}
