"""The test stack builder's environments (tests/support/stack.py): what a test asks for by field name is
what the service reads back from its variables, and a misspelt or invalid setting fails before anything
starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from chat_service.settings import ChatSettings
from chatmesh.common.settings import env_name
from embedding_service.settings import EmbeddingSettings
from inference_service.settings import InferenceSettings
from tests.support.chat import TEST_SECRET
from tests.support.stack import benchmark_chat_env, chat_env, embedding_env, inference_env

S = TypeVar("S", bound=BaseSettings)


def read_back(settings_type: type[S], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> S:
    """The settings a service started with `env` (and nothing else of ours) reads."""
    for name in [name for name in os.environ if name.startswith("CHATMESH_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings_type()


def test_a_chat_service_reads_back_what_the_test_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    env = chat_env(
        "127.0.0.1:1",
        "sqlite+aiosqlite:///chat.db",
        "127.0.0.1:2,127.0.0.1:3",
        migrate=False,
        cache_lookup_timeout_s=10,
        health_check_interval_s=0.1,
    )
    settings = read_back(ChatSettings, env, monkeypatch)
    assert settings.address == "127.0.0.1:1"
    assert settings.inference_addresses == ["127.0.0.1:2", "127.0.0.1:3"]
    assert settings.migrate_on_start is False
    assert (settings.cache_lookup_timeout_s, settings.health_check_interval_s) == (10, 0.1)
    assert settings.jwt_secret == TEST_SECRET and settings.summary_max_tokens == 32, "the tests' defaults"


def test_none_drops_a_default_and_a_benchmark_runs_on_the_services_own() -> None:
    secret = env_name(ChatSettings, "jwt_secret")
    assert secret not in chat_env(
        "127.0.0.1:1", "sqlite+aiosqlite:///chat.db", "127.0.0.1:2", jwt_secret=None
    )
    bench = benchmark_chat_env("127.0.0.1:1", "sqlite+aiosqlite:///chat.db", "127.0.0.1:2")
    assert bench[secret] == TEST_SECRET
    assert env_name(ChatSettings, "summary_max_tokens") not in bench


def test_the_engine_and_the_embedding_service_read_back_their_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine = read_back(
        InferenceSettings,
        inference_env("127.0.0.1:1", backend="llama_cpp", max_concurrent=1, run_dir=tmp_path),
        monkeypatch,
    )
    assert (engine.backend, engine.max_concurrent) == ("llama_cpp", 1)
    embedding = read_back(EmbeddingSettings, embedding_env("127.0.0.1:2", tmp_path / "qdrant"), monkeypatch)
    assert embedding.address == "127.0.0.1:2" and embedding.log_level == "DEBUG"


def test_a_misspelt_or_invalid_setting_fails_before_anything_starts() -> None:
    with pytest.raises(ValidationError, match="cache_lookup_timout_s"):
        chat_env("127.0.0.1:1", "sqlite+aiosqlite:///chat.db", "127.0.0.1:2", cache_lookup_timout_s=10)
    with pytest.raises(ValidationError, match="max_concurrent"):
        inference_env("127.0.0.1:1", max_concurrent=0)
