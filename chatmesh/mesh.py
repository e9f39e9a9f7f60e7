"""`chatmesh run`: start every service of the mesh on this machine and stop them all on Ctrl-C.

Each service runs as its own process (as it would in production) with embedded defaults, so nothing
external is needed. Progress is shown while models load; the log lines of all services are interleaved
on the terminal, prefixed with the service name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatmesh.common.children import Child, ChildFailed, NotReady, accepting, child_process, start_child
from chatmesh.common.loopback import is_loopback_host
from chatmesh.common.private_files import keep_files_private, private_directory
from chatmesh.common.service_settings import (
    ChatServiceSettings,
    EmbeddingServiceSettings,
    InferenceServiceSettings,
)
from chatmesh.common.settings import env_for, env_name
from chatmesh.models.catalog import DEFAULT_MODEL, QWEN_CODER_05B, SMOLLM2_135M
from chatmesh.models.served import ServedModel, parse_served_models
from chatmesh.models.store import ModelFileError, ModelStore
from gateway import EnvoyProcess, GatewaySettings, run_envoy

RUN_DIR = Path(".run")
"""The mesh's working directory (relative to where it runs): secrets, database, logs; mode 0700."""


class MeshSettings(BaseSettings):
    """Ports and options of a local mesh, from `CHATMESH_MESH_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CHATMESH_MESH_", frozen=True)

    host: str = Field(
        "127.0.0.1",
        description="address every service listens on; loopback unless set (another one exposes the"
        " services to the network, which the dev sign-in refuses)",
    )
    chat_port: int = Field(50051, description="first chat replica; replica n listens on chat_port + 10 * n")
    chat_replicas: int = Field(2, ge=1)
    gateway: bool = Field(True, description="put Envoy in front of the chat replicas")
    gateway_host: str = Field(
        "127.0.0.1",
        description="address Envoy listens on; loopback unless set (0.0.0.0: every interface, for a team"
        " on the network, which needs dev_sign_in off or a configured JWT key)",
    )
    gateway_port: int = 8080
    dev_sign_in: bool = Field(
        True,
        description="the web page's sign-in with any user name and no password, while the chat service"
        " uses the mesh's own dev secret; on loopback only",
    )
    gateway_admin_port: int = 9901
    inference_port: int = 50052
    embedding_port: int = 50053
    metrics_port: int = Field(
        9101,
        description="Prometheus /metrics of chat replica 1; replica n on metrics_port + 10 * n, inference on"
        " metrics_port + 1, embedding on metrics_port + 2",
    )
    nats_url: str | None = Field(
        None,
        description="NATS with JetStream for asynchronous jobs; unset: the mesh starts the bundled"
        " nats-server on nats_port, keeping its streams under .run/nats",
    )
    nats_port: int = 14222

    @property
    def jobs_nats_url(self) -> str:
        """The NATS the chat replicas queue jobs on."""
        return self.nats_url or f"nats://{self.host}:{self.nats_port}"

    startup_timeout_s: float = Field(300.0, description="longest wait for a service to become healthy")
    restart_backoff_s: float = Field(1.0, gt=0, description="wait before restarting a crashed service")
    stable_after_s: float = Field(
        60.0, gt=0, description="a service that ran this long before crashing starts its backoff afresh"
    )
    max_fast_crashes: int = Field(
        5, ge=1, description="crashes in a row, each soon after start, before the mesh gives up"
    )
    log_format: str = "text"
    models: str = Field(
        ",".join(dict.fromkeys((DEFAULT_MODEL, QWEN_CODER_05B.name, SMOLLM2_135M.name))),
        description="the models the inference service serves, comma-separated, the default first: catalog"
        " names (`chatmesh models list`; pulled before the service starts) or NAME=PATH for a local GGUF;"
        " CHATMESH_INFERENCE_MODELS or CHATMESH_INFERENCE_GGUF_PATH, when set, win",
    )


GGUF_PATH_VARIABLE = "CHATMESH_INFERENCE_GGUF_PATH"
"""The inference service's single-file setting (its own settings class is the service's, not ours)."""


@dataclass(frozen=True)
class MeshModels:
    """What the mesh's inference service serves, and which setting says so."""

    variable: str
    """`CHATMESH_MESH_MODELS`, or the inference service's own setting when the user set it."""
    served: list[ServedModel]
    """In order, the default first; empty when a single GGUF file is configured (`GGUF_PATH`)."""

    @property
    def from_mesh(self) -> bool:
        """Whether the launcher passes its own `models` setting on (the user set neither of the service's)."""
        return self.variable == env_name(MeshSettings, "models")


def mesh_models(settings: MeshSettings) -> MeshModels:
    """The models the mesh serves: the user's own `CHATMESH_INFERENCE_MODELS` or `..._GGUF_PATH` when
    set (respected as they are), else the mesh's `models`. `ServedModelsError` for a setting that does
    not parse, naming the variable."""
    inference_models = env_name(InferenceServiceSettings, "models")
    configured = InferenceServiceSettings().models
    if configured.strip():
        return MeshModels(inference_models, parse_served_models(configured, inference_models))
    if os.environ.get(GGUF_PATH_VARIABLE):
        return MeshModels(GGUF_PATH_VARIABLE, [])
    variable = env_name(MeshSettings, "models")
    return MeshModels(variable, parse_served_models(settings.models, variable))


def pull_missing_models(models: MeshModels, store: ModelStore | None = None) -> None:
    """Pull every catalog model of `models` whose file is not in the cache yet, with progress on stderr
    (a fresh machine's first `make run`). A file that is there but damaged is left to the inference
    service's check, whose error names `chatmesh models pull NAME`. Blocking."""
    store = store if store is not None else ModelStore()
    missing = [m.catalog for m in models.served if m.catalog is not None and not store.is_pulled(m.catalog)]
    for model in missing:
        print(f"  {'models':<10} pulling {model.name} into {store.cache_dir} (once)...", flush=True)
        store.pull(model)


def dev_sign_in_on(settings: MeshSettings) -> bool:
    """Whether the mesh offers the password-less dev sign-in: asked for, and the chat service checks
    tokens with the mesh's own dev secret (a configured key means an identity provider signs users in)."""
    return settings.dev_sign_in and ChatServiceSettings().uses_dev_secret()


def check_exposure(settings: MeshSettings) -> None:
    """`ValueError` naming the settings and the fix when the mesh would offer the dev sign-in (a token
    for any user name, no password) to other machines: any address but loopback needs it off."""
    exposed = [
        f"{env_name(MeshSettings, name)}={host}"
        for name, host in (
            ("gateway_host", settings.gateway_host if settings.gateway else "127.0.0.1"),
            ("host", settings.host),
        )
        if not is_loopback_host(host)
    ]
    if exposed and dev_sign_in_on(settings):
        raise ValueError(
            f"{' and '.join(exposed)} would let anyone on the network sign in as any user: the dev sign-in"
            " hands out tokens without a password, so it runs on loopback only. Either listen on this"
            f" machine (unset those settings) or turn the dev sign-in off with"
            f" {env_name(MeshSettings, 'dev_sign_in')}=false (then give each user a token with `chatmesh"
            f" token USER`), or configure a JWT key ({env_name(ChatServiceSettings, 'jwt_secret_file')} or"
            f" {env_name(ChatServiceSettings, 'jwt_public_key_file')}) so that your identity provider signs"
            " users in"
        )


@dataclass
class ServiceSpec:
    """How to start one service process and how to tell it is ready."""

    name: str
    module: str
    address: str
    env: dict[str, str] = field(default_factory=dict)
    loads_model: bool = False
    metrics_address: str | None = None


@dataclass
class RunningService:
    spec: ServiceSpec
    child: Child
    """Its process; replaced by the supervisor's restarts."""


def plan(settings: MeshSettings) -> list[ServiceSpec]:
    """The services to start, in order (dependencies first).

    Only addresses are set here; everything else (database URL, JWT key, backend) comes from the
    services' own settings, so `CHATMESH_CHAT_DATABASE_URL=postgresql+asyncpg://...` and friends work.
    Each environment is rendered from the service's typed settings (`chatmesh.common.service_settings`),
    which name the variables and check the values.
    """
    models = mesh_models(settings)
    inference = _model_service(
        settings,
        "inference",
        "inference_service",
        InferenceServiceSettings,
        settings.inference_port,
        1,
        # The user's own model settings reach the service from the environment, untouched.
        {"models": settings.models} if models.from_mesh else {},
    )
    embedding = _model_service(
        settings, "embedding", "embedding_service", EmbeddingServiceSettings, settings.embedding_port, 2
    )
    dev_sign_in = dev_sign_in_on(settings)
    chat = [
        _chat_replica(settings, replica, inference.address, embedding.address, dev_sign_in)
        for replica in range(settings.chat_replicas)
    ]
    return [inference, embedding, *chat]


_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
"""Every service runs without the network for models: they are downloaded before the mesh starts."""


def _model_service(
    settings: MeshSettings,
    name: str,
    module: str,
    settings_type: type[BaseSettings],
    port: int,
    metrics_offset: int,
    values: dict[str, object] | None = None,
) -> ServiceSpec:
    """The inference or embedding service: its address, its metrics at `metrics_port + metrics_offset`,
    and any further `values` of its settings."""
    address = f"{settings.host}:{port}"
    metrics = f"{settings.host}:{settings.metrics_port + metrics_offset}"
    env = env_for(
        settings_type,
        address=address,
        log_format=settings.log_format,
        metrics_address=metrics,
        **(values or {}),
    )
    return ServiceSpec(name, module, address, {**_OFFLINE, **env}, loads_model=True, metrics_address=metrics)


def _chat_replica(
    settings: MeshSettings, replica: int, inference: str, embedding: str, dev_sign_in: bool
) -> ServiceSpec:
    """Chat replica number `replica` (from 0), on ports 10 apart, with the services it calls."""
    address = f"{settings.host}:{settings.chat_port + 10 * replica}"
    metrics = f"{settings.host}:{settings.metrics_port + 10 * replica}"
    chat_env = env_for(
        ChatServiceSettings,
        address=address,
        inference_address=inference,
        # The semantic cache, on the embedding service's vector index (embedded Qdrant).
        cache_address=embedding,
        # Asynchronous jobs, on the mesh's NATS; every replica also runs them.
        jobs_nats_url=settings.jobs_nats_url,
        log_format=settings.log_format,
        metrics_address=metrics,
        # The web page's sign-in without a password: only while no key is configured, for callers on
        # this machine.
        dev_sign_in=dev_sign_in,
    )
    return ServiceSpec(
        f"chat-{replica + 1}", "chat_service", address, {**_OFFLINE, **chat_env}, metrics_address=metrics
    )


async def _wait_healthy(service: RunningService, timeout_s: float) -> None:
    """Wait until its gRPC health says SERVING and show how long that took; `ChildFailed` if the
    process exits first or `timeout_s` passes."""
    address = service.spec.address
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError as exc:
                raise NotReady(f"health check: {exc.code().name}") from None
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        waited = await service.child.wait_ready(
            serving, f"gRPC health SERVING on {address}", timeout_s, interval_s=0.25
        )
    print(f"  {service.spec.name:<10} ready on {address} ({waited:.1f}s)", flush=True)


async def _start(spec: ServiceSpec) -> RunningService:
    child = await start_child(
        spec.name,
        [sys.executable, "-m", spec.module],
        # Its log on the terminal, each line prefixed with its name; a group of its own, so that Ctrl-C
        # reaches only us and we stop the services in order.
        log_path=None,
        env={**os.environ, **spec.env},
    )
    return RunningService(spec, child)


async def _stop(services: Sequence[RunningService], grace_s: float = 15.0) -> None:
    for service in reversed(services):
        service.child.ask_to_stop()
    for service in reversed(services):
        await service.child.stop(grace_s)


@contextlib.asynccontextmanager
async def running_mesh(
    specs: Sequence[ServiceSpec], startup_timeout_s: float
) -> AsyncIterator[list[RunningService]]:
    """Start `specs` in order, each once the previous is healthy; stop all (reverse order) on exit."""
    services: list[RunningService] = []
    try:
        for spec in specs:
            print(
                f"  {spec.name:<10} starting{' (loading its model)' if spec.loads_model else ''}...",
                flush=True,
            )
            services.append(await _start(spec))
            await _wait_healthy(services[-1], startup_timeout_s)
        yield services
    finally:
        await _stop(services)


async def supervise(service: RunningService, settings: MeshSettings) -> None:
    """Restart `service` whenever it exits, after a backoff that doubles with each crash that follows a
    short run (from `restart_backoff_s` up to 30 s); return when it crashed `max_fast_crashes` times in
    a row within `stable_after_s` of starting, which the caller treats as fatal. The other services keep
    serving meanwhile: Envoy routes around a dead chat replica, and the chat service answers UNAVAILABLE
    while the engine is away."""
    fast_crashes = 0
    while True:
        started = time.monotonic()
        code = await service.child.wait()
        ran_s = time.monotonic() - started
        fast_crashes = fast_crashes + 1 if ran_s < settings.stable_after_s else 1
        if fast_crashes >= settings.max_fast_crashes:
            print(
                f"chatmesh: {service.spec.name} crashed {fast_crashes} times in a row within"
                f" {settings.stable_after_s:.0f} s of starting (last exit code {code}); giving up",
                file=sys.stderr,
                flush=True,
            )
            return
        delay = min(30.0, settings.restart_backoff_s * 2 ** (fast_crashes - 1))
        print(
            f"chatmesh: {service.spec.name} exited with code {code} after {ran_s:.1f} s;"
            f" restarting it in {delay:.1f} s (the rest keep serving)",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.sleep(delay)
        service.child = (await _start(service.spec)).child
        try:
            await _wait_healthy(service, settings.startup_timeout_s)
        except ChildFailed as exc:
            print(f"chatmesh: {exc}", file=sys.stderr, flush=True)
            continue  # it exited while starting: the next pass counts it as a fast crash
        print(f"chatmesh: {service.spec.name} is back", file=sys.stderr, flush=True)


async def run(settings: MeshSettings) -> int:
    """Run the mesh until Ctrl-C / SIGTERM (also during start-up) or until a process dies."""
    try:
        check_exposure(settings)
        models = mesh_models(settings)
    except ValueError as exc:
        print(f"chatmesh: {exc}", file=sys.stderr)
        return 1
    try:
        # Before anything starts (and before the umask turns private: the cache is shared by checkouts),
        # with progress: a fresh machine's first run downloads the models here.
        await asyncio.to_thread(pull_missing_models, models)
    except (ModelFileError, OSError) as exc:
        print(f"chatmesh: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("chatmesh: stopped", flush=True)
        return 0
    # The JWT secret, Envoy's config with it, the database, the vector index, the job streams, logs:
    # everything the mesh and its services (children inherit the umask) write is the owner's alone.
    keep_files_private()
    await asyncio.to_thread(private_directory, RUN_DIR)
    try:
        # The API-key secret (`.run/api-key-secret` unless configured), created here once rather than
        # raced for by chat replicas starting together; the gateway gets its settings like the JWT ones.
        await asyncio.to_thread(ChatServiceSettings().api_key_keys)
    except (OSError, ValueError) as exc:
        print(f"chatmesh: the API-key secret: {exc}", file=sys.stderr)
        return 1
    print("chatmesh: starting the mesh", flush=True)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Cancelling unwinds `running_mesh`, which stops every started service in reverse order.
        loop.add_signal_handler(sig, main.cancel)
    try:
        async with (
            _nats(settings) as nats,
            running_mesh(plan(settings), settings.startup_timeout_s) as services,
            _gateway(settings, services) as gateway,
        ):
            _print_welcome(services, gateway, dev_sign_in_on(settings), models)
            # The services heal (each is restarted by its supervisor); the gateway and NATS hold no
            # state worth a restart loop, and their exit takes the mesh down.
            watched: dict[asyncio.Task[object], str] = {
                asyncio.create_task(supervise(service, settings)): service.spec.name for service in services
            }
            if gateway is not None:
                watched[asyncio.create_task(gateway.process.wait())] = "gateway (Envoy)"
            if nats is not None:
                watched[asyncio.create_task(nats.wait())] = "nats-server"
            try:
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in watched:
                    task.cancel()
            names = ", ".join(watched[task] for task in done)
            print(f"chatmesh: {names} exited for good; stopping the rest", file=sys.stderr)
            return 1
    except asyncio.CancelledError:
        print("chatmesh: stopped", flush=True)
        return 0
    except (RuntimeError, ValueError) as exc:
        print(f"chatmesh: {exc}", file=sys.stderr)
        return 1


@contextlib.asynccontextmanager
async def _nats(settings: MeshSettings) -> AsyncIterator[Child | None]:
    """The bundled NATS server for the job queue, unless the settings name one to use."""
    if settings.nats_url:
        yield None
        return
    from chatmesh.common.nats_server import nats_server_args

    store = RUN_DIR / "nats"
    await asyncio.to_thread(private_directory, store)
    log_path = RUN_DIR / "nats.log"
    print(f"  {'nats':<10} starting nats-server (JetStream) on :{settings.nats_port}...", flush=True)
    async with child_process(
        "nats-server",
        nats_server_args(settings.nats_port, store.resolve(), settings.host),
        grace_s=10.0,
        log_path=log_path,
        append_log=True,
    ) as nats:
        await nats.wait_ready(
            lambda: accepting(settings.host, settings.nats_port),
            f"connections on {settings.host}:{settings.nats_port}",
            30.0,
            hint=f"port {settings.nats_port} taken? set {env_name(MeshSettings, 'nats_port')}"
            f" or {env_name(MeshSettings, 'nats_url')}",
        )
        print(f"  {'nats':<10} ready on {settings.jobs_nats_url} (log: {log_path})", flush=True)
        yield nats


@contextlib.asynccontextmanager
async def _gateway(
    settings: MeshSettings, services: Sequence[RunningService]
) -> AsyncIterator[EnvoyProcess | None]:
    """Envoy in front of the chat replicas, checking tokens with the chat service's own JWT keys."""
    if not settings.gateway:
        yield None
        return
    chat = ChatServiceSettings()
    engine = InferenceServiceSettings()
    gateway_settings = GatewaySettings(
        listen_host=settings.gateway_host,
        listen_port=settings.gateway_port,
        admin_port=settings.gateway_admin_port,
        chat_addresses=[s.spec.address for s in services if s.spec.module == "chat_service"],
        dev_sign_in=dev_sign_in_on(settings),
        # The same key material, by the same rules and with the same clock skew (`JwtSettings`).
        **chat.jwt_settings(),
    )
    # Refuse at the edge what the one engine cannot hold (its slots and queue), fast, rather than after a
    # replica and the engine have spent work on it (docs/jobs.md, "Overload"); the gateway's own setting,
    # when given (read from its environment), wins.
    if "max_active_completions" not in gateway_settings.model_fields_set:
        gateway_settings = gateway_settings.model_copy(
            update={"max_active_completions": engine.concurrency + engine.max_queue}
        )
    workdir = await asyncio.to_thread(private_directory, RUN_DIR)
    print(
        f"  {'gateway':<10} starting Envoy on {settings.gateway_host}:{settings.gateway_port}...", flush=True
    )
    async with run_envoy(gateway_settings, workdir) as envoy:
        print(f"  {'gateway':<10} ready on {envoy.base_url} (log: {envoy.log_path})", flush=True)
        yield envoy


def _print_welcome(
    services: Sequence[RunningService], gateway: EnvoyProcess | None, dev_sign_in: bool, models: MeshModels
) -> None:
    from chatmesh.common.auth import issue_token

    by_name = {s.spec.name: s.spec.address for s in services}
    keys = ChatServiceSettings().jwt_keys()
    # With RS256 only the holder of the private key can sign (`chatmesh token dev --private-key FILE`).
    token = issue_token(keys, "dev") if keys.sign_key is not None else None
    print("\nchatmesh is up:")
    if gateway is not None:
        sign_in = (
            "sign in with any user name, from this machine"
            if keys.sign_key is not None and dev_sign_in
            else "sign in with a token (`chatmesh token USER`, or from your identity provider)"
        )
        print(f"  {'web page':<10} {gateway.base_url}/  ({sign_in})")
        # Where it really listens: every interface is a different promise from this machine alone.
        reach = (
            "this machine only (loopback)"
            if gateway.loopback_only
            else "every machine that can reach this one"
        )
        print(f"  {'':<10} listening on {gateway.bind_address}: reachable from {reach}")
        print(
            f"  {'gateway':<10} {gateway.base_url}  (REST, OpenAI-compatible /v1 and gRPC; admin"
            f" http://{gateway.admin_address}, loopback only)"
        )
    for service in services:
        metrics = (
            f"  metrics http://{service.spec.metrics_address}/metrics" if service.spec.metrics_address else ""
        )
        print(f"  {service.spec.name:<10} grpc://{service.spec.address}{metrics}")
    if gateway is not None:
        print(f"  {'':<10} Envoy's own metrics: http://{gateway.admin_address}/stats/prometheus")
    served = ", ".join(model.name for model in models.served) or f"the file {GGUF_PATH_VARIABLE} names"
    print(f"  {'models':<10} {served}  (the first is the default; {models.variable}; `chatmesh models list`)")
    print("\nTry it:")
    key_option = "" if token else " --private-key YOUR-PRIVATE-KEY.pem"
    print(
        f"  export TOKEN=$(.venv/bin/chatmesh token dev{key_option})   # a JWT for user 'dev'; any user works"
    )
    if gateway is not None:
        url = gateway.base_url
        print(
            f'  curl -N -H "Authorization: Bearer $TOKEN"'
            f' -d \'{{"content": "What is the capital of France?"}}\' {url}/chat'
        )
        print(f'  curl -H "Authorization: Bearer $TOKEN" {url}/chats')
        print(f"  .venv/bin/chatmesh chat --address {gateway.listen_address}   # interactive, streamed")
    else:
        print(f"  .venv/bin/chatmesh chat --address {by_name['chat-1']}")
    print(f"  .venv/bin/chatmesh generate --address {by_name['inference']} 'Hello'   # the engine alone")
    if token:
        print(f"\nA dev token for user 'dev' (valid 30 days):\n  {token}")
    print("\nPress Ctrl-C to stop.", flush=True)
