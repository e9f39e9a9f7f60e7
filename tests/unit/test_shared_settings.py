"""Settings two parts need are defined once in the shared runtime and read under each part's own names."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from chat_service.settings import ChatSettings
from chatmesh.common.auth import DEV_SECRET_FILE, JWT_LEEWAY_S, issue_token, verify_token
from chatmesh.common.auth_settings import JwtSettings
from chatmesh.common.errors import Unauthenticated
from chatmesh.common.service_settings import ChatServiceSettings, InferenceServiceSettings
from chatmesh.common.settings import ServiceSettings, env_for, env_name
from chatmesh.mesh import MeshSettings, plan
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
    # Both providers (sign-in tokens and API keys) allow the same skew.
    providers = by_name["envoy.filters.http.jwt_authn"]["providers"].values()
    assert [provider["clock_skew_seconds"] for provider in providers] == [JWT_LEEWAY_S] * 2
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


def test_env_names_come_from_each_class_s_prefix() -> None:
    assert env_name(ChatServiceSettings, "jwt_secret_file") == "CHATMESH_CHAT_JWT_SECRET_FILE"
    assert env_name(InferenceServiceSettings, "metrics_address") == "CHATMESH_INFERENCE_METRICS_ADDRESS"
    assert env_name(GatewaySettings, "jwt_clock_skew_s") == "CHATMESH_GATEWAY_JWT_CLOCK_SKEW_S"
    assert env_name(MeshSettings, "dev_sign_in") == "CHATMESH_MESH_DEV_SIGN_IN"
    with pytest.raises(KeyError):
        env_name(ChatServiceSettings, "no_such_setting")


def test_env_for_renders_checked_values_as_settings_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_jwt_environment(monkeypatch)
    env = env_for(ChatServiceSettings, address="127.0.0.1:1", dev_sign_in=True, jwt_clock_skew_s=7)
    assert env == {
        "CHATMESH_CHAT_ADDRESS": "127.0.0.1:1",
        "CHATMESH_CHAT_DEV_SIGN_IN": "true",
        "CHATMESH_CHAT_JWT_CLOCK_SKEW_S": "7",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    read = ChatSettings()
    assert (read.address, read.dev_sign_in, read.jwt_clock_skew_s) == ("127.0.0.1:1", True, 7)
    with pytest.raises(pydantic.ValidationError, match="metrics_address"):
        env_for(ChatServiceSettings, metrics_address="nowhere")
    with pytest.raises(pydantic.ValidationError, match="no_such_setting"):
        env_for(ChatServiceSettings, no_such_setting="1")
    with pytest.raises(ValueError, match="CHATMESH_CHAT_CACHE_ADDRESS"):
        env_for(ChatServiceSettings, cache_address=None)


def test_the_mesh_s_plan_is_read_back_by_each_service_s_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_jwt_environment(monkeypatch)
    mesh = MeshSettings(chat_replicas=2, nats_url="nats://127.0.0.1:4222")
    service_settings: dict[str, type[ServiceSettings]] = {
        "chat_service": ChatSettings,
        "inference_service": InferenceSettings,
        "embedding_service": EmbeddingSettings,
    }
    by_name = {}
    for spec in plan(mesh):
        with monkeypatch.context() as env:
            for name, value in spec.env.items():
                env.setenv(name, value)
            by_name[spec.name] = settings = service_settings[spec.module]()
        assert (settings.address, settings.metrics_address, settings.log_format) == (
            spec.address,
            spec.metrics_address,
            mesh.log_format,
        )
    chat = by_name["chat-2"]
    assert isinstance(chat, ChatSettings)
    assert (chat.inference_address, chat.cache_address, chat.jobs_nats_url, chat.dev_sign_in) == (
        by_name["inference"].address,
        by_name["embedding"].address,
        "nats://127.0.0.1:4222",
        True,
    )
