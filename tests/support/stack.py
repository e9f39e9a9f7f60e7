"""The services a test runs against, started from typed settings: one stack builder for every test module.

Settings are the services' own fields by name (`context_length=512`, `cache_address=...`, as in
`InferenceSettings`, `ChatSettings`, `EmbeddingSettings`), rendered to their `CHATMESH_<SERVICE>_*`
variables by `env_for`: the service's own validators check them before anything starts, and no test
writes a variable's name by hand.

- `inference_env`, `standard_engine_env`, `chat_env`, `embedding_env`: a service's environment (on top of
  os.environ, see `run_service`), for a test that starts the process itself;
- `inference_service`, `chat_service`, `embedding_service`: one service on a free port, until the `with`
  block ends (its `Service.process.returncode` is set once it has);
- `chat_stack`: chat replicas on one database and, with `envoy_dir`, Envoy in front of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat_service.settings import ChatSettings
from chatmesh.common.settings import env_for
from embedding_service.settings import EmbeddingSettings
from gateway import EnvoyProcess, GatewaySettings, run_envoy
from inference_service.settings import InferenceSettings
from tests.support.chat import TEST_SECRET
from tests.support.processes import LoggedProcess, free_port, run_service
from tests.support.services import MODEL_STARTUP_TIMEOUT_S, SHARED_ENGINE_CONTEXT, SHARED_ENGINE_MAX_TOKENS

CHAT_STARTUP_TIMEOUT_S = 60
"""How long a chat service may take to report SERVING (it loads no model; migrations on a cold disk)."""

TEST_CHAT_SETTINGS: Mapping[str, object] = {
    "jwt_secret": TEST_SECRET,
    "default_history_strategy": "full",
    # Small, so that a summary is written and extended within a few turns.
    "summary_keep_recent_messages": 2,
    "summary_min_messages_to_fold": 4,
    "summary_max_tokens": 32,
}
"""What every test chat service runs with unless the test says otherwise (`chat_env(..., jwt_secret=None)`
drops a default)."""

BENCHMARK_CHAT_SETTINGS: Mapping[str, object] = {
    "jwt_secret": TEST_SECRET,
    "default_history_strategy": "full",
}
"""The `defaults` of a benchmark's chat service: the service's own defaults but the test secret and whole
histories (no test-sized summaries)."""

GATEWAY_RATE_PER_S = 10
GATEWAY_BURST = 20
"""The per-user rate limit of a test gateway (`rate_limit_per_s=0` switches it off)."""


def free_address() -> str:
    """A free address on 127.0.0.1."""
    return f"127.0.0.1:{free_port()}"


TEST_MODEL = "gemma-3-270m"
"""The model a test's inference service serves unless the test names `models` or a `gguf_path`: the
light one (the bundled file, nothing to pull), so the suite does not slow down with a larger default."""


def inference_env(address: str, **settings: object) -> dict[str, str]:
    """Environment of an inference service on `address` (the default backend, llama-server), serving
    `TEST_MODEL` unless `settings` (InferenceSettings fields) name `models` or a `gguf_path`."""
    if "models" not in settings and "gguf_path" not in settings:
        settings = {**settings, "models": TEST_MODEL}
    return env_for(InferenceSettings, address=address, **settings)


def standard_engine_env(address: str, **settings: object) -> dict[str, str]:
    """The settings most tests run an inference service with: the session's shared one
    (tests/conftest.py), and private copies that a test may kill."""
    standard = {"context_length": SHARED_ENGINE_CONTEXT, "default_max_tokens": SHARED_ENGINE_MAX_TOKENS}
    return inference_env(address, **{**standard, **settings})


def chat_env(
    address: str, database_url: str, inference: str, migrate: bool = True, **settings: object
) -> dict[str, str]:
    """Environment of a chat service on `address`, storing in `database_url`, generating with the
    inference service(s) at `inference` (comma-separated), with `TEST_CHAT_SETTINGS` and `settings`
    (ChatSettings fields; None drops a default). `migrate=False` for a replica that starts on a schema
    another replica migrated."""
    return _chat_env(TEST_CHAT_SETTINGS, address, database_url, inference, migrate, settings)


def jobs_chat_env(
    address: str,
    database_url: str,
    inference: str,
    nats_url: str,
    stream: str,
    migrate: bool = True,
    **settings: object,
) -> dict[str, str]:
    """`chat_env` for a replica with jobs on the NATS JetStream stream `stream` at `nats_url` (one stream
    per test: tests do not see each other's jobs)."""
    return chat_env(
        address, database_url, inference, migrate, jobs_nats_url=nats_url, jobs_stream=stream, **settings
    )


def benchmark_chat_env(
    address: str, database_url: str, inference: str, migrate: bool = True, **settings: object
) -> dict[str, str]:
    """`chat_env` for a benchmark: `BENCHMARK_CHAT_SETTINGS` instead of the tests' defaults."""
    return _chat_env(BENCHMARK_CHAT_SETTINGS, address, database_url, inference, migrate, settings)


def _chat_env(
    defaults: Mapping[str, object],
    address: str,
    database_url: str,
    inference: str,
    migrate: bool,
    settings: Mapping[str, object],
) -> dict[str, str]:
    values = {key: value for key, value in {**defaults, **settings}.items() if value is not None}
    return env_for(
        ChatSettings,
        address=address,
        database_url=database_url,
        inference_address=inference,
        migrate_on_start=migrate,
        **values,
    )


def embedding_env(address: str, vectors_path: Path | None = None, **settings: object) -> dict[str, str]:
    """Environment of an embedding service on `address`; DEBUG logs record every request and batch.

    With `vectors_path` it serves the vector index from that directory (local mode locks it: one
    service per directory); without, the vector service is off, so no test touches `.run/qdrant`."""
    vectors: dict[str, object] = (
        {"vectors_path": vectors_path} if vectors_path is not None else {"vectors_enabled": False}
    )
    return env_for(
        EmbeddingSettings, address=address, **{"threads": 2, "log_level": "DEBUG", **vectors, **settings}
    )


@dataclass(frozen=True)
class Service:
    """A running service: where it listens and its process (with its log)."""

    address: str
    process: LoggedProcess


@contextlib.contextmanager
def inference_service(
    address: str | None = None,
    standard: bool = True,
    timeout: float = MODEL_STARTUP_TIMEOUT_S,
    **settings: object,
) -> Iterator[Service]:
    """An inference service of the test's own on `address` (default: a free port): `standard_engine_env`'s
    settings (with `standard=False`, the service's defaults) and `settings`."""
    at = address or free_address()
    env = standard_engine_env(at, **settings) if standard else inference_env(at, **settings)
    with run_service("inference_service", env, at, timeout) as process:
        yield Service(at, process)


@contextlib.contextmanager
def embedding_service(
    vectors_path: Path | None = None,
    address: str | None = None,
    timeout: float = MODEL_STARTUP_TIMEOUT_S,
    **settings: object,
) -> Iterator[Service]:
    """An embedding service of the test's own on `address` (default: a free port; see `embedding_env`)."""
    at = address or free_address()
    env = embedding_env(at, vectors_path, **settings)
    with run_service("embedding_service", env, at, timeout) as process:
        yield Service(at, process)


@contextlib.contextmanager
def chat_service(
    database_url: str,
    inference: str,
    migrate: bool = True,
    address: str | None = None,
    timeout: float = CHAT_STARTUP_TIMEOUT_S,
    **settings: object,
) -> Iterator[Service]:
    """A chat service on `address` (default: a free port), see `chat_env`."""
    at = address or free_address()
    env = chat_env(at, database_url, inference, migrate, **settings)
    with run_service("chat_service", env, at, timeout) as process:
        yield Service(at, process)


def gateway_settings(replicas: list[str], **overrides: Any) -> GatewaySettings:
    """A test gateway in front of `replicas`: free ports, tokens signed with `TEST_SECRET`, the test rate
    limit, fast health checks; `overrides` are GatewaySettings fields."""
    values: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": free_port(),
        "admin_port": free_port(),
        "chat_addresses": replicas,
        "jwt_secret": TEST_SECRET,
        "rate_limit_per_s": GATEWAY_RATE_PER_S,
        "rate_limit_burst": GATEWAY_BURST,
        # Fast, so that a killed replica is noticed within the test's patience.
        "health_check_interval_s": 0.5,
        "health_check_timeout_s": 0.5,
        "concurrency": 2,
    }
    return GatewaySettings(**{**values, **overrides})


@dataclass(frozen=True)
class Stack:
    """Chat replicas on one database, generating with `inference`, and Envoy in front if asked for."""

    inference: str
    database_url: str
    replicas: tuple[Service, ...]
    envoy_process: EnvoyProcess | None = None
    gateway: GatewaySettings | None = None
    """The gateway's settings (with Envoy)."""

    @property
    def chat(self) -> Service:
        """The first replica (the only one, unless the stack was asked for more)."""
        return self.replicas[0]

    @property
    def envoy(self) -> EnvoyProcess:
        """The gateway (the stack must have been started with `envoy_dir`)."""
        assert self.envoy_process is not None, "this stack runs without Envoy"
        return self.envoy_process


@contextlib.asynccontextmanager
async def chat_stack(
    inference: str,
    database_url: str,
    replicas: int = 1,
    envoy_dir: Path | None = None,
    gateway: Mapping[str, Any] | None = None,
    **settings: object,
) -> AsyncIterator[Stack]:
    """`replicas` chat services with `settings` (ChatSettings fields) on `database_url`, the first
    migrating it, the others starting on its schema; with `envoy_dir`, Envoy in front of them
    (`gateway_settings` with the `gateway` overrides), its files in that directory."""
    with contextlib.ExitStack() as services:
        started: list[Service] = []
        for i in range(replicas):
            at = free_address()
            env = chat_env(at, database_url, inference, i == 0, **settings)
            process = services.enter_context(run_service("chat_service", env, at, CHAT_STARTUP_TIMEOUT_S))
            started.append(Service(at, process))
        if envoy_dir is None:
            yield Stack(inference, database_url, tuple(started))
            return
        edge = gateway_settings([replica.address for replica in started], **(gateway or {}))
        async with run_envoy(edge, envoy_dir) as envoy:
            yield Stack(inference, database_url, tuple(started), envoy, edge)
