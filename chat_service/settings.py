"""Typed settings of the chat service, read from `CHATMESH_CHAT_*` environment variables."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import Field

from chat_service.domain import HistoryStrategy
from chatmesh.common.service_settings import ChatServiceSettings


class ChatSettings(ChatServiceSettings):
    """Everything the chat service can be configured with: the settings `chatmesh run` sets or reads
    (address, the other services' addresses, JWT, dev sign-in: `ChatServiceSettings`, in the shared
    runtime), and these."""

    database_url: str = Field(
        "sqlite+aiosqlite:///.run/chatmesh.db",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///file.db or postgresql+asyncpg://user@host/db",
    )
    migrate_on_start: bool = Field(True, description="run Alembic migrations to head at start-up")
    dependency_timeout_s: float = Field(
        120.0, description="how long to wait for the inference service at start"
    )
    health_check_interval_s: float = Field(
        2.0,
        gt=0,
        description="how often the database and the inference service are checked; gRPC health reports"
        " NOT_SERVING while either does not answer",
    )
    health_check_timeout_s: float = Field(1.0, gt=0, description="deadline of each dependency check")
    inference_model_info_timeout_s: float = Field(
        10.0, gt=0, description="deadline of each ListModels and GetModelInfo call to the inference service"
    )
    inference_count_timeout_s: float = Field(
        30.0, gt=0, description="deadline of each CountTokens call to the inference service"
    )
    inference_generate_timeout_s: float = Field(
        600.0, gt=0, description="deadline of a whole Generate stream, from the request to its last token"
    )
    default_history_strategy: HistoryStrategy = HistoryStrategy.WINDOW
    openai_max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="largest /v1/chat/completions body (as the protobuf Struct it arrives in) the OpenAI"
        " API reads, checked before the body is converted (pure Python, on a worker thread when large);"
        " larger is a 400. The gateway bounds the Struct it makes to its CHATMESH_GATEWAY_MAX_REQUEST_BYTES"
        " (the same 1 MiB by default) and answers first; this holds for callers that reach a replica"
        " directly",
    )
    replica_id: str = Field(
        default_factory=lambda: f"replica-{uuid.uuid4().hex[:12]}",
        max_length=64,
        description="this replica's name in completion leases (of completions and jobs); default: a random"
        " one",
    )
    completion_lease_s: float = Field(
        15.0,
        gt=0,
        description="a retry on another replica waits this long for a silent replica's reply before"
        " generating it itself",
    )

    # Per-user limits, counted in the database across every replica; beyond one, a 429 with a retry hint.
    max_concurrent_completions_per_user: int = Field(
        2,
        ge=0,
        description="completion streams (chat and /v1/chat/completions) one user may run at once; 0: no"
        " limit. The default leaves 6 of the engine's 8 slots to others while one user floods",
    )
    max_active_jobs_per_user: int = Field(
        20,
        ge=0,
        description="jobs one user may have queued or running at once; 0: no limit. The default is 2% of"
        " the default jobs capacity (1000), so one user cannot fill the queue",
    )

    # Semantic cache (the vector service runs in the embedding service's process); on with cache_address.
    cache_scope: Literal["user", "global"] = Field(
        "user",
        description="`user`: answers are only ever served to the user they were generated for; `global`:"
        " shared between users, except in chats with a system prompt of their own",
    )
    cache_ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description="how long a cached answer may be served")
    cache_lookup_timeout_s: float = Field(
        0.05, gt=0, description="a lookup that takes longer is a miss (the model answers)"
    )
    cache_write_timeout_s: float = Field(5.0, gt=0, description="deadline of a cache store or delete")
    cache_purge_interval_s: float = Field(
        600.0, gt=0, description="how often expired entries are deleted from the index"
    )
    cache_collection: str = Field("chat_answers", min_length=1)

    # Asynchronous completions (SubmitCompletion) on NATS JetStream; on with jobs_nats_url.
    jobs_stream: str = Field("CHATMESH_JOBS", min_length=1, description="JetStream stream of the job queue")
    jobs_capacity: int = Field(
        1000, ge=1, description="jobs queued or running at most; a submission beyond it gets 429"
    )
    jobs_max_attempts: int = Field(3, ge=1, description="attempts per job before it is marked failed")
    jobs_ack_wait_s: float = Field(
        30.0, gt=0, description="a job whose worker goes silent this long is given to another worker"
    )
    jobs_workers: int = Field(
        1, ge=0, description="jobs this replica runs at once (0: it only accepts jobs, others run them)"
    )
    jobs_sweep_interval_s: float = Field(
        10.0,
        gt=0,
        description="how often a replica with workers looks for jobs that were stored but never queued"
        " (their replica stopped in between) and queues them",
    )
    jobs_requeue_after_s: float = Field(
        30.0,
        gt=0,
        description="how old a job never queued must be before a sweep queues it (well beyond how long a"
        " submission takes to queue its job)",
    )

    # Summary strategy.
    summary_keep_recent_messages: int = Field(4, ge=0)
    summary_min_messages_to_fold: int = Field(2, ge=1)
    summary_max_tokens: int = Field(160, ge=16)

    # Accounting (docs/accounting.md): usage records, token budgets, API keys, admins.
    accounting: bool = Field(
        True,
        description="record every generation's usage and check budgets before each; off: no records, no"
        " budgets, no x-ratelimit-*-tokens headers (API keys still work)",
    )
    budget_user_daily_tokens: int = Field(
        0, ge=0, description="tokens (prompt + completion) one user may use per UTC day; 0: no limit"
    )
    budget_user_monthly_tokens: int = Field(
        0, ge=0, description="tokens one user may use per UTC calendar month; 0: no limit"
    )
    budget_group_daily_tokens: int = Field(
        0, ge=0, description="tokens all users of one group together may use per UTC day; 0: no limit"
    )
    budget_group_monthly_tokens: int = Field(
        0, ge=0, description="tokens all users of one group together may use per UTC month; 0: no limit"
    )
    budget_cache_s: float = Field(
        5.0,
        ge=0,
        description="how long a replica reuses a user's budget use for the x-ratelimit-*-tokens headers of"
        " calls that generate nothing (a generation always checks the database, and a replica's own"
        " usage records refresh it at once): reading it for every call cost GET /chats a fifth of its"
        " throughput (benchmarks/accounting_load.py)",
    )
    jwt_group_claim: str = Field(
        "group",
        min_length=1,
        description="the token claim naming the user's group (a string, or a list: its first)",
    )
    jwt_role_claim: str = Field(
        "role", min_length=1, description="the token claim holding the user's role(s)"
    )
    admin_role: str = Field("admin", min_length=1, description="the role that makes a user an admin")
    admin_users: list[str] = Field(
        default_factory=list,
        description='user ids that are admins whatever their token says (JSON list, e.g. ["alice"])',
    )
    api_key_cache_s: float = Field(
        2.0,
        ge=0,
        description="how long a replica trusts what it last read of an API key: a key revoked elsewhere is"
        " refused here within this many seconds (at once on the replica that revoked it)",
    )
    metrics_groups: int = Field(
        50,
        ge=1,
        description="distinct groups the token metrics label by; usage of further groups is labelled"
        " `other`, so a careless group claim cannot blow up the metrics' cardinality",
    )
