"""The accounting store interface: usage records and the running totals budgets are checked against,
budget overrides, the group each user counts against, and API keys."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from chat_service.accounting.values import (
    ApiKeyRecord,
    BudgetLimit,
    BudgetPeriod,
    BudgetScope,
    UsageEntry,
    UsageRow,
)


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """What a budget check reads in one query: the charged tokens of the current day and month of a user
    and of their group, and the overrides stored for them (absent: the default applies)."""

    used: Mapping[tuple[BudgetScope, BudgetPeriod], int]
    overrides: Mapping[tuple[BudgetScope, BudgetPeriod], int]


class AccountStore(Protocol):
    """Durable accounting. Usage records are also written by `ConversationStore.add_assistant_message`
    (its `usage` argument), in the reply's own transaction; this records the rest."""

    async def note_member(self, user_id: str, group: str) -> None:
        """Record that `user_id` counts against `group` ("" for none) from now on: the group later usage
        records of the user (a job's included) are charged to."""
        ...

    async def member_group(self, user_id: str) -> str:
        """The group `user_id` was last noted in ("" for none, or never noted)."""
        ...

    async def record_usage(self, entry: UsageEntry) -> bool:
        """Commit a usage record and add its charged tokens to the totals of the user and the user's group
        (as last noted) for the current day and month, in one transaction. Idempotent on
        `entry.request_key` (per user): False, and nothing changed, when a record with that key exists."""
        ...

    async def budget_use(self, user_id: str, group: str, now: datetime) -> BudgetUse:
        """The user's and the group's charged tokens in the day and month holding `now` (UTC), and the
        overrides for the user and the group; for group "" only the user's."""
        ...

    async def usage_rows(
        self, since: date, *, user_id: str | None = None, group: str | None = None, by_user: bool = False
    ) -> Sequence[UsageRow]:
        """Usage from day `since` (UTC) on, summed by day and model (and by user and group with `by_user`),
        oldest day first; only `user_id`'s or `group`'s when given."""
        ...

    async def budget_overrides(self) -> Sequence[BudgetLimit]:
        """Every stored override."""
        ...

    async def set_budget(self, limit: BudgetLimit) -> None:
        """Store (or replace) the override for `limit`'s scope, subject and period."""
        ...

    async def clear_budget(self, scope: BudgetScope, subject: str, period: BudgetPeriod) -> None:
        """Remove that override, if any."""
        ...

    async def create_key(self, record: ApiKeyRecord) -> None:
        """Commit a new key."""
        ...

    async def get_key(self, key_id: uuid.UUID) -> ApiKeyRecord | None:
        """Any user's key by id (what a replica checks a bearer key against), or None."""
        ...

    async def list_keys(self, user_id: str) -> Sequence[ApiKeyRecord]:
        """The user's keys, newest first, revoked ones included."""
        ...

    async def revoke_keys(
        self, user_id: str, key_id: uuid.UUID | None, now: datetime
    ) -> Sequence[ApiKeyRecord]:
        """Revoke the user's key `key_id` (None: every key of the user) as of `now`; returns the keys it
        names as they are now (revoked before or now). `NotFound` when `key_id` is not the user's key."""
        ...
