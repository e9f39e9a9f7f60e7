"""Composition root of the chat service: settings -> store + inference client -> servicer -> serve."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from prometheus_client import CollectorRegistry

from chat_service.accounting.headers import BudgetHeadersInterceptor
from chat_service.accounting.identity import IdentityInterceptor, IdentityRules
from chat_service.accounting.keys import ApiKeys
from chat_service.accounting.ledger import BudgetDefaults, Ledger
from chat_service.accounting.servicers import AccountServicer, AdminServicer
from chat_service.cache.policy import CachePolicy, NoCache, ResponseCache, SemanticCache
from chat_service.cache.verification import VerificationRule, preload_word_frequencies
from chat_service.conversations import Conversations
from chat_service.dev_sign_in import SERVICE_NAME as DEV_SIGN_IN_SERVICE
from chat_service.dev_sign_in import DevSignInServicer
from chat_service.history import HistoryBuilder, SummaryPolicy
from chat_service.inference import (
    AffinityInferenceClient,
    GrpcInferenceClient,
    InferenceClient,
    ServedModels,
)
from chat_service.jobs.queue import JetStreamConfig, NatsJobQueue, redacted_url
from chat_service.jobs.service import Jobs, JobSweeper, JobWorker
from chat_service.metrics import ChatMetrics
from chat_service.openai_api import OpenAIServicer
from chat_service.servicer import ChatServicer
from chat_service.settings import ChatSettings
from chat_service.storage.base import JobStore
from chat_service.storage.sql import SqlAccountStore, SqlConversationStore, SqlJobStore, open_sql_database
from chatmesh.chat.v1 import account_pb2, account_pb2_grpc, chat_pb2, chat_pb2_grpc
from chatmesh.common.auth import PUBLIC_SERVICES
from chatmesh.common.children import NotReady, WaitTimedOut, poll_until
from chatmesh.common.errors import Unavailable
from chatmesh.common.health import DependencyHealth
from chatmesh.common.logs import configure_logging
from chatmesh.common.metrics import serve_metrics
from chatmesh.common.server import (
    CHANNEL_OPTIONS,
    add_health_and_reflection,
    create_server,
    serve_until_signal,
)
from chatmesh.common.tracing import ClientCalls, Tracing, open_tracing
from chatmesh.dev.v1 import dev_pb2_grpc
from chatmesh.openai.v1 import openai_pb2, openai_pb2_grpc
from chatmesh.vectors.client import GrpcVectorClient

log = logging.getLogger(__name__)

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
OPENAI_SERVICE_NAME = openai_pb2.DESCRIPTOR.services_by_name["OpenAIService"].full_name
ACCOUNT_SERVICE_NAME = account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name
ADMIN_SERVICE_NAME = account_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SERVICE_NAMES = [SERVICE_NAME, OPENAI_SERVICE_NAME, ACCOUNT_SERVICE_NAME, ADMIN_SERVICE_NAME]


async def wait_for_models(client: InferenceClient, timeout_s: float, address: str) -> ServedModels:
    """Ask the inference service which models it serves, waiting while it starts (models take a while)."""
    answered: list[ServedModels] = []

    async def answers() -> bool:
        try:
            answered.append(ServedModels(await client.list_models()))
        except Unavailable as exc:
            log.info("waiting for the inference service", extra={"address": address})
            raise NotReady(str(exc)) from None
        return True

    try:
        await poll_until(answers, f"answer from {address}", timeout_s, interval_s=1.0)
    except WaitTimedOut as exc:
        raise RuntimeError(
            f"the inference service at {address} did not answer within {timeout_s:.0f}s ({exc.reason});"
            " start it or set CHATMESH_CHAT_INFERENCE_ADDRESS"
        ) from None
    return answered[0]


async def connect_inference(
    settings: ChatSettings,
    channels: contextlib.AsyncExitStack,
    calls: ClientCalls,
    own_connections: bool = False,
) -> InferenceClient:
    """A client of the inference service: over one channel per replica in `inference_address` (the
    channels close with `channels`), spreading chats over the replicas when there are several.
    `own_connections`: connections not shared with the process's other channels to the same address
    (gRPC shares them, and with them their reconnection backoff, by default)."""
    options = [*CHANNEL_OPTIONS, *((("grpc.use_local_subchannel_pool", 1),) if own_connections else ())]
    replicas: list[tuple[str, InferenceClient]] = []
    for address in settings.inference_addresses:
        channel = await channels.enter_async_context(grpc.aio.insecure_channel(address, options=options))
        client = GrpcInferenceClient(
            channel,
            calls=calls,
            model_info_timeout_s=settings.inference_model_info_timeout_s,
            count_timeout_s=settings.inference_count_timeout_s,
            generate_timeout_s=settings.inference_generate_timeout_s,
        )
        replicas.append((address, client))
    return replicas[0][1] if len(replicas) == 1 else AffinityInferenceClient(replicas)


async def open_cache(
    settings: ChatSettings,
    channels: contextlib.AsyncExitStack,
    metrics: ChatMetrics,
    tracing: Tracing,
) -> ResponseCache:
    """The semantic cache the settings ask for: over the vector service at `cache_address`, or none."""
    if not settings.cache_address:
        log.info("semantic cache off (set CHATMESH_CHAT_CACHE_ADDRESS to the embedding service)")
        return NoCache()
    channel = await channels.enter_async_context(
        grpc.aio.insecure_channel(settings.cache_address, options=CHANNEL_OPTIONS)
    )
    vectors = GrpcVectorClient(
        channel,
        calls=tracing.client_calls(),
        search_timeout_s=settings.cache_lookup_timeout_s,
        write_timeout_s=settings.cache_write_timeout_s,
    )
    policy = CachePolicy(
        scope=settings.cache_scope,
        ttl_s=settings.cache_ttl_s,
        lookup_timeout_s=settings.cache_lookup_timeout_s,
        collection=settings.cache_collection,
    )
    log.info(
        "semantic cache on",
        extra={
            "address": settings.cache_address,
            "scope": settings.cache_scope,
            "ttl_s": settings.cache_ttl_s,
        },
    )
    preload_word_frequencies()  # at start-up rather than during the first cached question
    return SemanticCache(vectors, policy, VerificationRule(), metrics)


async def purge_periodically(cache: SemanticCache, interval_s: float) -> None:
    """Delete expired cache entries every `interval_s` (lookups ignore them meanwhile)."""
    while True:
        await asyncio.sleep(interval_s)
        purged = await cache.purge_expired()
        if purged:
            log.info("purged expired cache entries", extra={"entries": purged})


async def open_jobs(
    settings: ChatSettings,
    job_store: JobStore,
    conversations: Conversations,
    channels: contextlib.AsyncExitStack,
) -> tuple[Jobs | None, JobWorker | None]:
    """The job use cases and (with workers) the worker, on the NATS JetStream queue the settings name
    (closed with `channels`); none without one."""
    if not settings.jobs_nats_url:
        log.info("asynchronous jobs off (set CHATMESH_CHAT_JOBS_NATS_URL to a NATS JetStream server)")
        return None, None
    queue = await channels.enter_async_context(
        await NatsJobQueue.connect(
            JetStreamConfig(
                url=settings.jobs_nats_url,
                stream=settings.jobs_stream,
                subject=f"chatmesh.jobs.{settings.jobs_stream.lower()}",
                capacity=settings.jobs_capacity,
                max_attempts=settings.jobs_max_attempts,
                ack_wait_s=settings.jobs_ack_wait_s,
            )
        )
    )
    jobs = Jobs(job_store, queue, conversations, max_active_per_user=settings.max_active_jobs_per_user)
    worker: JobWorker | None = None
    if settings.jobs_workers:
        worker = JobWorker(
            job_store,
            queue,
            conversations,
            leases=conversations.leases,
            concurrency=settings.jobs_workers,
            heartbeat_s=settings.jobs_ack_wait_s / 3,
            sweeper=JobSweeper(
                job_store,
                queue,
                interval_s=settings.jobs_sweep_interval_s,
                grace_s=settings.jobs_requeue_after_s,
            ),
        )
    log.info(
        "asynchronous jobs on",
        extra={"nats": redacted_url(settings.jobs_nats_url), "workers": settings.jobs_workers},
    )
    return jobs, worker


def open_ledger(settings: ChatSettings, accounts: SqlAccountStore, metrics: ChatMetrics) -> Ledger | None:
    """The usage records and budgets, or None with the accounting off."""
    if not settings.accounting:
        log.info("accounting off: no usage records, no budgets (CHATMESH_CHAT_ACCOUNTING)")
        return None
    defaults = BudgetDefaults(
        settings.budget_user_daily_tokens,
        settings.budget_user_monthly_tokens,
        settings.budget_group_daily_tokens,
        settings.budget_group_monthly_tokens,
    )
    log.info("accounting on", extra={"default_budgets": str(defaults)})
    return Ledger(
        accounts,
        defaults,
        metrics=metrics,
        cache_s=settings.budget_cache_s,
        metrics_groups=settings.metrics_groups,
    )


async def serve(settings: ChatSettings) -> None:
    """Run the chat service until SIGTERM/SIGINT.

    Long on purpose (about 85 lines): it is the composition root, read top to bottom as the order in
    which the backends are opened, wired and, in reverse, closed; the parts with choices of their own
    are the functions above."""
    configure_logging("chat", settings.log_level, settings.log_format)
    keys = settings.jwt_keys()
    log.info(
        "starting", extra={"address": settings.address, "database": settings.database_url.split("@")[-1]}
    )
    registry = CollectorRegistry()
    metrics = ChatMetrics(registry)
    async with (
        open_tracing("chat", settings.otlp_endpoint) as tracing,
        open_sql_database(settings.database_url, migrate=settings.migrate_on_start) as database,
        contextlib.AsyncExitStack() as channels,
        serve_metrics(registry, settings.metrics_address),
    ):
        metrics.watch_database(database.engine)
        tracing.instrument_database(database.engine)
        store = SqlConversationStore(database)
        inference = await connect_inference(settings, channels, tracing.client_calls())
        # The dependency checks call the engine every few seconds, also while it is down, which keeps
        # their connection backing off between reconnection attempts; on connections of their own, the
        # completions' are not held back by that when the engine returns.
        inference_for_checks = await connect_inference(
            settings, channels, tracing.client_calls(), own_connections=True
        )
        models = await wait_for_models(inference, settings.dependency_timeout_s, settings.inference_address)
        log.info(
            "inference service ready",
            extra={
                "models": {info.model: info.context_length for info in models.all},
                "default_model": models.default.model,
            },
        )
        policy = SummaryPolicy(
            keep_recent_messages=settings.summary_keep_recent_messages,
            min_messages_to_fold=settings.summary_min_messages_to_fold,
            max_tokens=settings.summary_max_tokens,
        )
        cache = await open_cache(settings, channels, metrics, tracing)
        accounts = SqlAccountStore(database)
        ledger = open_ledger(settings, accounts, metrics)
        conversations = Conversations(
            store,
            inference,
            HistoryBuilder(store, inference, policy, ledger),
            models,
            settings.default_history_strategy,
            cache,
            replica_id=settings.replica_id,
            lease_s=settings.completion_lease_s,
            metrics=metrics,
            max_completions_per_user=settings.max_concurrent_completions_per_user,
            ledger=ledger,
        )
        jobs, worker = await open_jobs(settings, SqlJobStore(database), conversations, channels)
        open_services = PUBLIC_SERVICES | ({DEV_SIGN_IN_SERVICE} if settings.dev_sign_in else set())
        api_keys = ApiKeys(accounts, settings.api_key_keys(), cache_s=settings.api_key_cache_s)
        identity = IdentityInterceptor(
            keys,
            api_keys,
            IdentityRules(
                settings.jwt_group_claim,
                settings.jwt_role_claim,
                settings.admin_role,
                frozenset(settings.admin_users),
            ),
            accounts,
            open_services,
        )
        # Inside the identity check, which says whose budget the headers show.
        headers = [BudgetHeadersInterceptor(ledger, frozenset(SERVICE_NAMES))] if ledger is not None else []
        server = create_server([identity, *headers], tracing.server_interceptors())
        chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(conversations, jobs), server)
        openai_pb2_grpc.add_OpenAIServiceServicer_to_server(
            OpenAIServicer(conversations, max_body_bytes=settings.openai_max_body_bytes), server
        )
        account_pb2_grpc.add_AccountServiceServicer_to_server(AccountServicer(api_keys, ledger), server)
        account_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(api_keys, ledger), server)
        if settings.dev_sign_in:
            dev_pb2_grpc.add_DevSignInServiceServicer_to_server(DevSignInServicer(keys), server)
            log.warning("dev sign-in on: POST /dev/sign-in hands out a token for any user name")
        health = add_health_and_reflection(server, SERVICE_NAMES)
        server.add_insecure_port(settings.address)
        purging = (
            asyncio.create_task(purge_periodically(cache, settings.cache_purge_interval_s))
            if isinstance(cache, SemanticCache)
            else None
        )
        if worker is not None:
            worker.start()
        dependencies = DependencyHealth(
            health,
            SERVICE_NAMES,
            {"database": database.ping, "inference": inference_for_checks.model_info},
            interval_s=settings.health_check_interval_s,
            timeout_s=settings.health_check_timeout_s,
        )
        monitoring = asyncio.create_task(dependencies.watch())
        try:
            await serve_until_signal(server, health, SERVICE_NAMES, settings.shutdown_grace_s)
        finally:
            monitoring.cancel()
            if worker is not None:
                await worker.stop(settings.shutdown_grace_s)
            if purging is not None:
                purging.cancel()
            await conversations.close()
