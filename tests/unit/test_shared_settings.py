"""Settings two parts need are defined once in the shared runtime and read under each part's own names."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from chat_service.settings import ChatSettings
from chatmesh.common.auth import DEV_SECRET_FILE, JWT_LEEWAY_S, issue_token, verify_token
from chatmesh.common.auth_settings import JwtSettings
from chatmesh.common.errors import Unauthenticated
from chatmesh.common.settings import ServiceSettings
from embedding_service.settings import EmbeddingSettings
from gateway import GatewaySettings, build_envoy_config
from inference_service.settings import InferenceSettings

SECRET = "s" * 40


def _without_jwt_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for part in ("CHAT", "GATEWAY"):
        for name in JwtSettings.model_fields:
            monkeypatch.delenv(f"CHATMESH_{part}_{name.upper()}", raising=False)


@pytest.mark.parametrize(("settings_type", "prefix"), [(ChatSettings, "CHAT"), (GatewaySettings, "GATEWAY")])
def test_jwt_settings_are_read_under_each_parts_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings_type: type[JwtSettings], prefix: str
) -> None:
    _without_jwt_environment(monkeypatch)
    assert settings_type().uses_dev_secret()
    assert settings_type().jwt_secret_file == DEV_SECRET_FILE
    monkeypatch.setenv(f"CHATMESH_{prefix}_JWT_SECRET", SECRET)
    monkeypatch.setenv(f"CHATMESH_{prefix}_JWT_ISSUER", "https://id.example")
    monkeypatch.setenv(f"CHATMESH_{prefix}_JWT_AUDIENCE", "chatmesh")
    monkeypatch.setenv(f"CHATMESH_{prefix}_JWT_CLOCK_SKEW_S", "5")
    settings = settings_type()
    assert not settings.uses_dev_secret()
    keys = settings.jwt_keys()
    assert (keys.algorithm, keys.verify_key, keys.issuer, keys.audience, keys.leeway_s) == (
        "HS256",
        SECRET,
        "https://id.example",
        "chatmesh",
        5,
    )
    # An inline secret wins over the file; the file is used (and made) when it is the only key.
    monkeypatch.delenv(f"CHATMESH_{prefix}_JWT_SECRET")
    monkeypatch.setenv(f"CHATMESH_{prefix}_JWT_SECRET_FILE", str(tmp_path / "secret"))
    from_file = settings_type().jwt_keys()
    assert from_file.verify_key == (tmp_path / "secret").read_text().strip()
    with pytest.raises(ValueError, match=f"set CHATMESH_{prefix}_JWT_PUBLIC_KEY_FILE"):
        settings_type(jwt_secret_file=None).jwt_keys()


def test_the_leeway_is_one_value_for_the_service_and_envoy(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_jwt_environment(monkeypatch)
    chat = ChatSettings(jwt_secret=SECRET)
    gateway = GatewaySettings(**chat.jwt_settings())
    assert chat.jwt_keys().leeway_s == gateway.jwt_clock_skew_s == JWT_LEEWAY_S
    listener = build_envoy_config(gateway)["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    by_name = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    (provider,) = by_name["envoy.filters.http.jwt_authn"]["providers"].values()
    assert provider["clock_skew_seconds"] == JWT_LEEWAY_S
    # A token that expired within the leeway passes the service's check, one beyond it does not.
    keys = chat.jwt_keys()
    assert verify_token(keys, issue_token(keys, "ada", ttl_s=-(JWT_LEEWAY_S - 5))) == "ada"
    with pytest.raises(Unauthenticated, match="expired"):
        verify_token(keys, issue_token(keys, "ada", ttl_s=-(JWT_LEEWAY_S + 5)))


def test_a_negative_clock_skew_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMESH_GATEWAY_JWT_CLOCK_SKEW_S", "-1")
    with pytest.raises(pydantic.ValidationError, match="jwt_clock_skew_s"):
        GatewaySettings()


@pytest.mark.parametrize(
    ("settings_type", "prefix"),
    [(ChatSettings, "CHAT"), (InferenceSettings, "INFERENCE"), (EmbeddingSettings, "EMBEDDING")],
)
def test_every_service_reads_its_metrics_address_from_the_one_definition(
    monkeypatch: pytest.MonkeyPatch, settings_type: type[ServiceSettings], prefix: str
) -> None:
    assert "metrics_address" not in vars(settings_type).get("__annotations__", {})
    monkeypatch.delenv(f"CHATMESH_{prefix}_METRICS_ADDRESS", raising=False)
    assert settings_type().metrics_address is None
    monkeypatch.setenv(f"CHATMESH_{prefix}_METRICS_ADDRESS", "[::1]:9100")
    assert settings_type().metrics_address == "[::1]:9100"
    monkeypatch.setenv(f"CHATMESH_{prefix}_METRICS_ADDRESS", "9100")
    with pytest.raises(pydantic.ValidationError, match="metrics_address"):
        settings_type()
