"""What every service's settings have in common: where it listens, how it logs, how long it drains, where
it serves its metrics.

Each service subclasses `ServiceSettings` with its own `env_prefix` (so `CHATMESH_CHAT_ADDRESS`,
`CHATMESH_INFERENCE_LOG_LEVEL`, ...) and its own default `address`. `env_name` and `env_for` turn settings
back into the variables that set them, for whoever starts a service (`chatmesh run`), so that no variable
name is written by hand twice.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatmesh.common.metrics import split_address

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ServiceSettings(BaseSettings):
    """Settings shared by every gRPC service, read from the subclass's `CHATMESH_<SERVICE>_*` variables."""

    model_config = SettingsConfigDict(frozen=True)

    address: str = Field(description="host:port the gRPC server listens on")
    log_level: LogLevel = "INFO"
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one object per line, for collectors; text: for people"
    )
    otlp_endpoint: str | None = Field(
        None, description="host:port of an OTLP/gRPC collector to send traces to; unset: tracing off"
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="on SIGTERM, how long in-flight calls may finish before they are cancelled"
    )
    metrics_address: str | None = Field(
        None,
        description="host:port to serve Prometheus metrics on at /metrics (e.g. 0.0.0.0:9101; port 0: any"
        " free one); unset: off",
    )

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address_is_host_port(cls, value: str | None) -> str | None:
        # Checked here, at start, by the same rule `serve_metrics` reads it with.
        if value is not None:
            split_address(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        # `info` and `INFO` both work, as they do for Python's logging.
        return value.upper() if isinstance(value, str) else value


def env_name(settings_type: type[BaseSettings], field: str) -> str:
    """The environment variable `settings_type` reads `field` from: the field's alias, else the class's
    `env_prefix` and the field's name (upper case, as the project writes them). `KeyError` for a field the
    class does not have."""
    alias = settings_type.model_fields[field].validation_alias
    if isinstance(alias, str):
        return alias
    name = f"{settings_type.model_config.get('env_prefix', '')}{field}"
    return name if settings_type.model_config.get("case_sensitive") else name.upper()


def env_for(settings_type: type[BaseSettings], /, **values: object) -> dict[str, str]:
    """The environment variables that give a process reading `settings_type` these `values` (by field
    name), checked first by the class's own fields and validators: strings as they are, anything else as
    JSON, which is how pydantic-settings reads it back (`true`, `8`, `["a", "b"]`)."""
    settings = settings_type.model_validate(values)
    rendered = settings.model_dump(mode="json", include=set(values))
    env: dict[str, str] = {}
    for field in values:
        value = rendered[field]
        if value is None:
            raise ValueError(f"{env_name(settings_type, field)} cannot be set to None; leave it out instead")
        env[env_name(settings_type, field)] = value if isinstance(value, str) else json.dumps(value)
    return env
