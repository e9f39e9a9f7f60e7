"""The chat service's Prometheus metrics: completions by outcome, the semantic cache, history strategies
and database statement latency."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmesh.common.metrics import FAST_BUCKETS_S
from chatmesh.common.statements import statement_operation, watch_statements

COMPLETION_OUTCOMES = ("stop", "length", "cancelled", "failed")
CACHE_RESULTS = ("hit", "miss", "error")
_STATEMENT_KINDS = ("select", "insert", "update", "delete")


class ChatMetrics:
    """What the chat use cases report; one per service, over the service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._completions = Counter(
            "chatmesh_chat_completions",
            "Completions that ended, by outcome (stop, length, cancelled, failed), whether the answer"
            " came from the semantic cache, and the model that answered.",
            ["outcome", "cached", "gen_ai_request_model"],
            registry=registry,
        )
        self._cache = Counter(
            "chatmesh_chat_cache_lookups",
            "Semantic cache lookups by result (hit, miss, error: failed or over its time budget).",
            ["result"],
            registry=registry,
        )
        for result in CACHE_RESULTS:
            self._cache.labels(result)
        self._strategies = Counter(
            "chatmesh_chat_history_strategy",
            "Prompts built for the engine, by the chat's history strategy and model.",
            ["strategy", "gen_ai_request_model"],
            registry=registry,
        )
        self._usage_tokens = Counter(
            "chatmesh_usage_tokens",
            "Tokens used, by the user's group (never the user: the label set stays bounded; groups beyond"
            " CHATMESH_CHAT_METRICS_GROUPS are `other`, no group is `none`), model and type (prompt,"
            " completion, cached: served by the semantic cache, charged to no budget).",
            ["group", "gen_ai_request_model", "type"],
            registry=registry,
        )
        self._budget_rejections = Counter(
            "chatmesh_budget_rejections",
            "Completions refused because a token budget was used up, by the budget's scope (user, group)"
            " and period (day, month).",
            ["scope", "period"],
            registry=registry,
        )
        self._statements = Histogram(
            "chatmesh_chat_store_statement_seconds",
            "Database statement latency in the conversation store, by kind.",
            ["kind"],
            buckets=FAST_BUCKETS_S,
            registry=registry,
        )

    def completion_ended(self, outcome: str, cached: bool, model: str) -> None:
        """Count one completion by `model` (`outcome` one of COMPLETION_OUTCOMES)."""
        self._completions.labels(outcome, "true" if cached else "false", model).inc()

    def cache_lookup(self, result: str) -> None:
        """Count one cache lookup (`result` one of CACHE_RESULTS)."""
        self._cache.labels(result).inc()

    def tokens_used(self, group: str, model: str, prompt: int, completion: int, cached: int) -> None:
        """Count one generation's tokens under `group` (already bounded by the caller)."""
        for kind, tokens in (("prompt", prompt), ("completion", completion), ("cached", cached)):
            if tokens:
                self._usage_tokens.labels(group, model, kind).inc(tokens)

    def budget_rejected(self, scope: str, period: str) -> None:
        """Count one completion refused by the `scope` `period` budget."""
        self._budget_rejections.labels(scope, period).inc()

    def history_built(self, strategy: str, model: str) -> None:
        """Count one prompt built for `model` with `strategy`."""
        self._strategies.labels(strategy, model).inc()

    def watch_database(self, engine: AsyncEngine) -> None:
        """Time every statement `engine` executes (SQLAlchemy's cursor events, on the driver's side);
        a statement that raised is not timed."""

        def start(statement: str) -> tuple[str, float]:
            verb = statement_operation(statement).lower()
            return (verb if verb in _STATEMENT_KINDS else "other"), time.perf_counter()

        def end(started: tuple[str, float], error: BaseException | None) -> None:
            if error is None:
                kind, at = started
                self._statements.labels(kind).observe(time.perf_counter() - at)

        watch_statements(engine, start, end)


class NoMetrics(ChatMetrics):
    """Metrics nobody reads (unit tests, tools): the same interface over a private registry."""

    def __init__(self) -> None:
        super().__init__(CollectorRegistry())
