"""The public listener's HTTP filter chain, in the order a request meets it: the REST error vocabulary
(Lua), the request size limit (buffer), REST to gRPC (transcoder), the token check (jwt_authn), the dev
sign-in's loopback rule (RBAC), the per-user rate limit, the router; and the per-route configs of the
last two, which the routes carry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatmesh.common.auth import JwtKeys
from gateway.api import DEV_SIGN_IN_SERVICE, ServiceApi
from gateway.envoy_json import router, typed
from gateway.jwks import jwks
from gateway.rest_errors import rest_errors_filter
from gateway.settings import GatewaySettings

USER_HEADER = "x-chatmesh-user"
"""Request header carrying the verified token subject, for the per-user rate limit. jwt_authn strips any
client-supplied copy before setting it."""

JWT_PROVIDER = "chatmesh"
API_KEY_PROVIDER = "chatmesh_api_key"
"""API keys: JWTs the mesh signs itself with its API-key secret, with their own issuer and no `exp` unless
the key expires. The chat service checks them again (revoked? scopes?)."""

LOOPBACK_PREFIXES = (("127.0.0.0", 8), ("::1", 128), ("::ffff:127.0.0.0", 104))
"""The peers the dev sign-in answers: this machine, by the connection's own address (never a header)."""


def loopback_only() -> dict[str, Any]:
    """Per-route RBAC that lets only loopback peers through. `direct_remote_ip` is the address of the TCP
    connection itself, which no client can choose, unlike X-Forwarded-For or x-envoy-external-address."""
    return typed(
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


def rate_limit_per_route(settings: GatewaySettings) -> dict[str, Any]:
    """Per-route `local_ratelimit`: one token bucket per verified token subject."""
    bucket = {
        "max_tokens": settings.rate_limit_burst,
        "tokens_per_fill": settings.rate_limit_per_s,
        "fill_interval": "1s",
    }
    return typed(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix="per_user",
        # Required on a route; only used for a request without a user, which jwt_authn never lets by.
        token_bucket=bucket,
        filter_enabled={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        filter_enforced={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        # An empty value is a wildcard: one bucket per distinct user, kept in an LRU of this size.
        descriptors=[{"entries": [{"key": "user", "value": ""}], "token_bucket": dict(bucket)}],
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


def _request_size_limit(settings: GatewaySettings) -> dict[str, Any]:
    # The request size limit, for every protocol: the body as the client sent it (JSON, or gRPC
    # frames, which no other filter bounds) is held here whole, and one byte over the limit is
    # refused (413; RESOURCE_EXHAUSTED for gRPC, see local_replies.py) before the token is even
    # checked, so no replica ever reads it. Every call sends its one request message at once (no
    # method streams requests), so holding it costs no latency worth counting.
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": typed(
            "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=settings.max_request_bytes
        ),
    }


def _transcoder(settings: GatewaySettings, api: ServiceApi, descriptor_path: Path) -> dict[str, Any]:
    # The first filter to change a request, so that everything after it (JWT rules, rate limit,
    # routes) sees one path space: REST requests rewritten to /<package>.<Service>/<Method>; gRPC
    # passes through.
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": typed(
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
    }


def _jwt_authn(settings: GatewaySettings, api: ServiceApi) -> dict[str, Any]:
    provider = _provider(settings, settings.jwt_keys(), require_expiration=True)
    if settings.jwt_issuer:
        provider["issuer"] = settings.jwt_issuer
    if settings.jwt_audience:
        provider["audiences"] = [settings.jwt_audience]
    api_key_provider = _provider(settings, settings.api_key_keys(), require_expiration=False)
    api_key_provider["issuer"] = settings.api_key_issuer
    # Either a sign-in token or an API key; both set the user header the rate limit counts by.
    either = {
        "requires_any": {
            "requirements": [{"provider_name": JWT_PROVIDER}, {"provider_name": API_KEY_PROVIDER}]
        }
    }
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={JWT_PROVIDER: provider, API_KEY_PROVIDER: api_key_provider},
            rules=[
                {"match": {"prefix": prefix}, "requires": either}
                for prefix in api.grpc_prefixes
                # Signing in is how a token is had.
                if prefix != f"/{DEV_SIGN_IN_SERVICE}/"
            ],
        ),
    }


def _provider(settings: GatewaySettings, keys: JwtKeys, *, require_expiration: bool) -> dict[str, Any]:
    return {
        "local_jwks": {"inline_string": json.dumps(jwks(keys))},
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
        "require_expiration": require_expiration,
    }


def http_filters(settings: GatewaySettings, api: ServiceApi, descriptor_path: Path) -> list[dict[str, Any]]:
    """The public listener's HTTP filters, in order."""
    filters = [
        rest_errors_filter(api),
        _request_size_limit(settings),
        _transcoder(settings, api, descriptor_path),
        _jwt_authn(settings, api),
    ]
    if settings.dev_sign_in:
        filters.append(
            {
                # No rules here: only the dev sign-in's routes carry a policy (loopback_only).
                "name": "envoy.filters.http.rbac",
                "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC"),
            }
        )
    if settings.rate_limit_per_s > 0:
        filters.append(
            {
                "name": "envoy.filters.http.local_ratelimit",
                # Disabled here; the ChatService routes carry the per-user configuration.
                "typed_config": typed(
                    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                    stat_prefix="per_user",
                ),
            }
        )
    filters.append(router())
    return filters
