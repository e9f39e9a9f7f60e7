"""`Ledger`: the accounting use cases. It records what generations used, checks budgets before a
completion starts, says what remains of them (for `GET /usage` and the `x-ratelimit-*-tokens` headers),
and reports usage and sets budgets for admins."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from chat_service.accounting.identity import current_caller
from chat_service.accounting.store import AccountStore
from chat_service.accounting.token_headers import token_headers
from chat_service.accounting.values import (
    BudgetLimit,
    BudgetPeriod,
    BudgetScope,
    BudgetStatus,
    UsageEntry,
    UsageRow,
)
from chat_service.metrics import ChatMetrics, NoMetrics
from chatmesh.common.errors import ResourceExhausted, Unauthenticated

DEFAULT_SUBJECT = "*"
"""The subject of a default budget (from settings): every user, or every group."""

MAX_REPORT_DAYS = 400


@dataclass(frozen=True, slots=True)
class BudgetDefaults:
    """The budgets from settings, in tokens per period; 0: no limit."""

    user_daily: int = 0
    user_monthly: int = 0
    group_daily: int = 0
    group_monthly: int = 0

    def tokens(self, scope: BudgetScope, period: BudgetPeriod) -> int:
        if scope is BudgetScope.USER:
            return self.user_daily if period is BudgetPeriod.DAY else self.user_monthly
        return self.group_daily if period is BudgetPeriod.DAY else self.group_monthly


class BudgetExhausted(ResourceExhausted):
    """A completion refused because `status`'s budget is used up: RESOURCE_EXHAUSTED (HTTP 429) with the
    time to its reset as the retry delay."""

    def __init__(self, status: BudgetStatus, now: datetime) -> None:
        self.status = status
        super().__init__(describe_exhausted(status), max(1.0, (status.reset_at - now).total_seconds()))
        self._now = now

    def metadata(self) -> list[tuple[str, str]]:
        # The x-ratelimit-*-tokens headers of the refusal (see `chat_service.accounting.headers`).
        return token_headers(self.status, self._now)


def describe_exhausted(status: BudgetStatus) -> str:
    """What a user over budget reads: which budget, what it allows, what was used, when it resets."""
    limit = status.limit
    whose = "your" if limit.scope is BudgetScope.USER else f"your group's ({limit.subject})"
    period = "daily" if limit.period is BudgetPeriod.DAY else "monthly"
    reset = status.reset_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"{whose} {period} token budget of {limit.tokens} tokens is used up ({status.used_tokens} used);"
        f" it resets at {reset}"
    )


def most_constraining(statuses: Sequence[BudgetStatus]) -> BudgetStatus | None:
    """The limited budget with the fewest tokens left (ties: the one that resets last), or None."""
    limited = [status for status in statuses if status.remaining_tokens is not None]
    if not limited:
        return None
    return min(limited, key=lambda s: (s.remaining_tokens, -s.reset_at.timestamp()))


class Ledger:
    """Usage and budgets over an `AccountStore`, shared by every replica through the database."""

    def __init__(
        self,
        store: AccountStore,
        defaults: BudgetDefaults,
        *,
        metrics: ChatMetrics | None = None,
        cache_s: float = 1.0,
        metrics_groups: int = 50,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._defaults = defaults
        self._metrics = metrics or NoMetrics()
        self._cache_s = cache_s
        self._metrics_groups = metrics_groups
        self._labelled_groups: set[str] = set()
        self._clock = clock
        # user -> (monotonic time read, statuses): the header values of calls that generate nothing.
        self._recent: dict[str, tuple[float, list[BudgetStatus]]] = {}
        # user -> group, as last seen by this replica (a job's worker may not have seen its user call).
        self._groups: dict[str, str] = {}

    # -- budgets ------------------------------------------------------------------------------------------

    async def group_of(self, user_id: str) -> str:
        """The group `user_id` is charged to: the caller's own claim when they are the caller, else what
        the store last noted."""
        try:
            caller = current_caller()
        except Unauthenticated:
            caller = None
        if caller is not None and caller.user_id == user_id:
            self._groups[user_id] = caller.group
            return caller.group
        if user_id not in self._groups:
            self._groups[user_id] = await self._store.member_group(user_id)
        return self._groups[user_id]

    async def statuses(self, user_id: str) -> list[BudgetStatus]:
        """Every budget that applies to the user (user and group, day and month), with its use now, read
        from the store."""
        group = await self.group_of(user_id)
        now = self._clock()
        use = await self._store.budget_use(user_id, group, now)
        statuses = []
        for scope, subject in ((BudgetScope.USER, user_id), (BudgetScope.GROUP, group)):
            if not subject:
                continue
            for period in BudgetPeriod:
                override = use.overrides.get((scope, period))
                tokens = override if override is not None else self._defaults.tokens(scope, period)
                statuses.append(
                    BudgetStatus(
                        BudgetLimit(scope, subject, period, tokens, overridden=override is not None),
                        use.used.get((scope, period), 0),
                        period.reset_at(now),
                    )
                )
        self._recent[user_id] = (time.monotonic(), statuses)
        return statuses

    async def admit(self, user_id: str) -> None:
        """Raise `BudgetExhausted` if any budget of the user is used up (the one that resets last, as
        that is when they may go on). Reads the store: budgets hold across replicas."""
        exhausted = [status for status in await self.statuses(user_id) if status.exhausted]
        if not exhausted:
            return
        worst = max(exhausted, key=lambda status: status.reset_at)
        self._metrics.budget_rejected(worst.limit.scope.value, worst.limit.period.value)
        raise BudgetExhausted(worst, self._clock())

    async def header_status(self, user_id: str) -> BudgetStatus | None:
        """The user's most constraining budget for the `x-ratelimit-*-tokens` headers, reusing what this
        replica read in the last `cache_s` seconds (a generation's check always reads afresh)."""
        recent = self._recent.get(user_id)
        if recent is not None and time.monotonic() - recent[0] < self._cache_s:
            return most_constraining(recent[1])
        if len(self._recent) > 10_000:
            self._recent.clear()  # bounded: the users of the last few seconds come back at once
        return most_constraining(await self.statuses(user_id))

    # -- usage --------------------------------------------------------------------------------------------

    async def record(self, entry: UsageEntry) -> None:
        """Record a generation that stored no reply (a stateless answer, a summary), once per
        `entry.request_key`."""
        if await self._store.record_usage(entry):
            await self.counted(entry)

    async def counted(self, entry: UsageEntry) -> None:
        """Note in the metrics (and this replica's header cache) a usage record that was written."""
        self._recent.pop(entry.user_id, None)
        group = await self.group_of(entry.user_id)
        self._metrics.tokens_used(
            self._group_label(group),
            entry.model,
            entry.prompt_tokens,
            entry.completion_tokens,
            entry.cached_tokens,
        )

    def _group_label(self, group: str) -> str:
        if not group:
            return "none"
        if group in self._labelled_groups:
            return group
        if len(self._labelled_groups) >= self._metrics_groups:
            return "other"
        self._labelled_groups.add(group)
        return group

    # -- reports and settings -----------------------------------------------------------------------------

    def _since(self, days: int) -> date:
        return self._clock().astimezone(UTC).date() - timedelta(days=days - 1)

    async def usage(self, user_id: str, days: int) -> Sequence[UsageRow]:
        """The user's usage by day and model over the last `days` days (today included)."""
        return await self._store.usage_rows(self._since(days), user_id=user_id)

    async def team_usage(self, days: int, user_id: str | None, group: str | None) -> Sequence[UsageRow]:
        """Usage by day, user, group and model over the last `days` days."""
        return await self._store.usage_rows(self._since(days), user_id=user_id, group=group, by_user=True)

    async def budgets(self) -> list[BudgetStatus]:
        """The defaults (subject `*`, no use) and every override with its use in the current period."""
        now = self._clock()
        result = [
            BudgetStatus(
                BudgetLimit(scope, DEFAULT_SUBJECT, period, self._defaults.tokens(scope, period)),
                0,
                period.reset_at(now),
            )
            for scope in BudgetScope
            for period in BudgetPeriod
        ]
        for limit in await self._store.budget_overrides():
            if limit.scope is BudgetScope.USER:
                use = await self._store.budget_use(limit.subject, "", now)
            else:
                # A group's use is read beside some user's; no user of it is needed for the group's rows.
                use = await self._store.budget_use("", limit.subject, now)
            used = use.used.get((limit.scope, limit.period), 0)
            result.append(BudgetStatus(limit, used, limit.period.reset_at(now)))
        return result

    async def set_budget(self, limit: BudgetLimit) -> BudgetStatus:
        """Store an override; returns it with its use now."""
        await self._store.set_budget(limit)
        self._recent.clear()
        return next(
            status
            for status in await self.budgets()
            if status.limit.overridden
            and (status.limit.scope, status.limit.subject, status.limit.period)
            == (limit.scope, limit.subject, limit.period)
        )

    async def clear_budget(self, scope: BudgetScope, subject: str, period: BudgetPeriod) -> BudgetStatus:
        """Remove an override; returns the default that applies again."""
        await self._store.clear_budget(scope, subject, period)
        self._recent.clear()
        now = self._clock()
        return BudgetStatus(
            BudgetLimit(scope, subject, period, self._defaults.tokens(scope, period)), 0, period.reset_at(now)
        )
