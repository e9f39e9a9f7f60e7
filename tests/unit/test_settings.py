"""The settings every service shares come from one base, under each service's own variable names."""

from __future__ import annotations

import pydantic
import pytest

from chat_service.settings import ChatSettings
from chatmesh.common.settings import ServiceSettings
from embedding_service.settings import EmbeddingSettings
from inference_service.settings import InferenceSettings


@pytest.mark.parametrize(
    ("settings_type", "prefix", "default_address"),
    [
        (ChatSettings, "CHATMESH_CHAT_", "127.0.0.1:50051"),
        (InferenceSettings, "CHATMESH_INFERENCE_", "127.0.0.1:50052"),
        (EmbeddingSettings, "CHATMESH_EMBEDDING_", "127.0.0.1:50053"),
    ],
)
def test_common_settings_use_each_services_prefix(
    monkeypatch: pytest.MonkeyPatch, settings_type: type[ServiceSettings], prefix: str, default_address: str
) -> None:
    assert settings_type().address == default_address
    monkeypatch.setenv(f"{prefix}ADDRESS", "0.0.0.0:9000")
    monkeypatch.setenv(f"{prefix}LOG_LEVEL", "debug")
    monkeypatch.setenv(f"{prefix}LOG_FORMAT", "text")
    monkeypatch.setenv(f"{prefix}SHUTDOWN_GRACE_S", "2.5")
    settings = settings_type()
    assert (settings.address, settings.log_level, settings.log_format, settings.shutdown_grace_s) == (
        "0.0.0.0:9000",
        "DEBUG",
        "text",
        2.5,
    )
    with pytest.raises(pydantic.ValidationError):
        settings.address = "elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize(("name", "value"), [("LOG_LEVEL", "loud"), ("SHUTDOWN_GRACE_S", "-1")])
def test_bad_common_settings_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"CHATMESH_CHAT_{name}", value)
    with pytest.raises(pydantic.ValidationError, match=name.lower()):
        ChatSettings()


def test_the_dev_sign_in_runs_only_with_the_dev_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CHATMESH_CHAT_JWT_SECRET",
        "CHATMESH_CHAT_JWT_SECRET_FILE",
        "CHATMESH_CHAT_JWT_PUBLIC_KEY_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATMESH_CHAT_DEV_SIGN_IN", "true")
    assert ChatSettings().uses_dev_secret()
    monkeypatch.setenv("CHATMESH_CHAT_JWT_SECRET", "a-configured-secret")
    with pytest.raises(pydantic.ValidationError, match="unset CHATMESH_CHAT_DEV_SIGN_IN"):
        ChatSettings()
    monkeypatch.delenv("CHATMESH_CHAT_JWT_SECRET")
    monkeypatch.setenv("CHATMESH_CHAT_JWT_SECRET_FILE", "/etc/chatmesh/jwt-secret")
    with pytest.raises(pydantic.ValidationError, match="identity provider"):
        ChatSettings()
