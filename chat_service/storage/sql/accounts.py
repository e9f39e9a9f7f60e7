"""The SQL accounting store (`AccountStore`) on the chat service's database: usage records and their
running totals, budget overrides, the group each user is charged to, and API keys.

`insert_usage` is also what `SqlConversationStore.add_assistant_message` runs to record a reply's usage
in the reply's own transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, String, Table, and_, delete, func, literal, select, tuple_, union_all
from sqlalchemy import update as sql_update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from chat_service.accounting.store import AccountStore, BudgetUse
from chat_service.accounting.values import (
    ApiKeyRecord,
    BudgetLimit,
    BudgetPeriod,
    BudgetScope,
    KeyScope,
    UsageEntry,
    UsageRow,
)
from chat_service.storage.models import (
    AccountMemberRow,
    ApiKeyRow,
    BudgetOverrideRow,
    UsageRecordRow,
    UsageTotalRow,
)
from chat_service.storage.sql.database import SqlDatabase
from chat_service.storage.sql.rows import utc_now
from chatmesh.common.errors import NotFound

_RECORDS = cast(Table, UsageRecordRow.__table__)
_TOTALS = cast(Table, UsageTotalRow.__table__)
_OVERRIDES = cast(Table, BudgetOverrideRow.__table__)
_MEMBERS = cast(Table, AccountMemberRow.__table__)
_KEYS = cast(Table, ApiKeyRow.__table__)


def _insert(is_postgresql: bool, table: Table) -> Any:
    """An INSERT of the dialect, which has ON CONFLICT (the two dialects spell it the same way)."""
    return postgresql.insert(table) if is_postgresql else sqlite.insert(table)


async def insert_usage(
    executor: AsyncConnection | AsyncSession, entry: UsageEntry, now: datetime, *, is_postgresql: bool
) -> bool:
    """Within the caller's transaction: insert the usage record, charged to the user's group as noted in
    `account_members` ("" when none), and add its charged tokens to the totals of the user and (when not
    "") the group for the day and month holding `now`. False, and nothing written, when a record with the
    same `message_id` or (user, `request_key`) exists."""
    is_pg = is_postgresql
    group = func.coalesce(
        select(_MEMBERS.c.user_group).where(_MEMBERS.c.user_id == entry.user_id).scalar_subquery(), ""
    )
    day = BudgetPeriod.DAY.start(now)
    statement = (
        _insert(is_pg, _RECORDS)
        .values(
            id=uuid.uuid4(),
            user_id=entry.user_id,
            user_group=group,
            kind=entry.kind.value,
            model=entry.model,
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            cached_tokens=entry.cached_tokens,
            ttft_ms=entry.ttft_ms,
            duration_ms=entry.duration_ms,
            outcome=entry.outcome.value,
            chat_id=entry.chat_id,
            message_id=entry.message_id,
            request_key=entry.request_key,
            day=day,
            created_at=now,
        )
        # Any unique key: the reply's record, or the same request key, is there already (a retry).
        .on_conflict_do_nothing()
        .returning(_RECORDS.c.user_group)
    )
    charged_to = (await executor.execute(statement)).scalar_one_or_none()
    if charged_to is None:
        return False
    tokens = entry.charged_tokens
    if tokens <= 0:
        return True
    subjects = [(BudgetScope.USER, entry.user_id)]
    if charged_to:
        subjects.append((BudgetScope.GROUP, charged_to))
    rows = [
        {
            "scope": scope.value,
            "subject": subject,
            "period": period.value,
            "period_start": period.start(now),
            "tokens": tokens,
        }
        for scope, subject in subjects
        for period in BudgetPeriod
    ]
    upsert = _insert(is_pg, _TOTALS).values(rows)
    # Atomic on both backends: concurrent records of one user add up, never overwrite each other.
    await executor.execute(
        upsert.on_conflict_do_update(
            index_elements=[_TOTALS.c.scope, _TOTALS.c.subject, _TOTALS.c.period, _TOTALS.c.period_start],
            set_={"tokens": _TOTALS.c.tokens + upsert.excluded.tokens},
        )
    )
    return True


def _scopes_text(scopes: frozenset[KeyScope]) -> str:
    return " ".join(sorted(scope.value for scope in scopes))


def _to_key(row: Row[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row.id,
        user_id=row.user_id,
        group=row.user_group,
        name=row.name,
        scopes=frozenset(KeyScope(scope) for scope in row.scopes.split()),
        prefix=row.prefix,
        secret_hash=row.secret_hash,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


_NEWEST_FIRST = (_KEYS.c.created_at.desc(), _KEYS.c.id.desc())


class SqlAccountStore(AccountStore):
    """`AccountStore` on the chat service's database (shared with the conversation and job stores).

    Subclasses the Protocol explicitly so that mypy checks every signature against it."""

    def __init__(self, database: SqlDatabase) -> None:
        self._db = database

    @property
    def database(self) -> SqlDatabase:
        return self._db

    async def note_member(self, user_id: str, group: str) -> None:
        upsert = _insert(self._db.is_postgresql, _MEMBERS).values(
            user_id=user_id, user_group=group, updated_at=utc_now()
        )
        async with self._db.engine.begin() as connection:
            await connection.execute(
                upsert.on_conflict_do_update(
                    index_elements=[_MEMBERS.c.user_id],
                    set_={"user_group": upsert.excluded.user_group, "updated_at": upsert.excluded.updated_at},
                    # Noted on every call of a user: write only when the group changed.
                    where=_MEMBERS.c.user_group != upsert.excluded.user_group,
                )
            )

    async def member_group(self, user_id: str) -> str:
        async with self._db.engine.connect() as connection:
            group = await connection.scalar(
                select(_MEMBERS.c.user_group).where(_MEMBERS.c.user_id == user_id)
            )
        return group or ""

    async def record_usage(self, entry: UsageEntry) -> bool:
        async with self._db.engine.begin() as connection:
            return await insert_usage(connection, entry, utc_now(), is_postgresql=self._db.is_postgresql)

    async def budget_use(self, user_id: str, group: str, now: datetime) -> BudgetUse:
        subjects = [(BudgetScope.USER.value, user_id)]
        if group:
            subjects.append((BudgetScope.GROUP.value, group))
        totals = [
            (scope, subject, period.value, period.start(now))
            for scope, subject in subjects
            for period in BudgetPeriod
        ]
        # One round trip: the totals and the overrides, told apart by the first column.
        used = select(
            literal("used", String).label("what"), _TOTALS.c.scope, _TOTALS.c.period, _TOTALS.c.tokens
        ).where(
            tuple_(_TOTALS.c.scope, _TOTALS.c.subject, _TOTALS.c.period, _TOTALS.c.period_start).in_(totals)
        )
        overridden = select(
            literal("override", String).label("what"),
            _OVERRIDES.c.scope,
            _OVERRIDES.c.period,
            _OVERRIDES.c.tokens,
        ).where(tuple_(_OVERRIDES.c.scope, _OVERRIDES.c.subject).in_(subjects))
        async with self._db.reader.connect() as connection:
            rows = (await connection.execute(union_all(used, overridden))).all()
        found: dict[str, dict[tuple[BudgetScope, BudgetPeriod], int]] = {"used": {}, "override": {}}
        for what, scope, period, tokens in rows:
            found[what][(BudgetScope(scope), BudgetPeriod(period))] = int(tokens)
        return BudgetUse(used=found["used"], overrides=found["override"])

    async def usage_rows(
        self, since: date, *, user_id: str | None = None, group: str | None = None, by_user: bool = False
    ) -> Sequence[UsageRow]:
        r = _RECORDS
        keys: list[ColumnElement[Any]] = [r.c.day, r.c.model]
        if by_user:
            keys += [r.c.user_id, r.c.user_group]
        conditions = [r.c.day >= since]
        if user_id is not None:
            conditions.append(r.c.user_id == user_id)
        if group is not None:
            conditions.append(r.c.user_group == group)
        statement = (
            select(
                *keys,
                func.sum(r.c.prompt_tokens),
                func.sum(r.c.completion_tokens),
                func.sum(r.c.cached_tokens),
                func.count(),
            )
            .where(and_(*conditions))
            .group_by(*keys)
            .order_by(*keys)
        )
        async with self._db.reader.connect() as connection:
            rows = (await connection.execute(statement)).all()
        return [
            UsageRow(
                day=row[0],
                model=row[1],
                prompt_tokens=int(row[-4]),
                completion_tokens=int(row[-3]),
                cached_tokens=int(row[-2]),
                requests=int(row[-1]),
                user_id=row[2] if by_user else "",
                group=row[3] if by_user else "",
            )
            for row in rows
        ]

    async def budget_overrides(self) -> Sequence[BudgetLimit]:
        o = _OVERRIDES
        async with self._db.reader.connect() as connection:
            rows = (
                await connection.execute(
                    select(o.c.scope, o.c.subject, o.c.period, o.c.tokens).order_by(
                        o.c.scope, o.c.subject, o.c.period
                    )
                )
            ).all()
        return [
            BudgetLimit(BudgetScope(scope), subject, BudgetPeriod(period), int(tokens), overridden=True)
            for scope, subject, period, tokens in rows
        ]

    async def set_budget(self, limit: BudgetLimit) -> None:
        upsert = _insert(self._db.is_postgresql, _OVERRIDES).values(
            scope=limit.scope.value,
            subject=limit.subject,
            period=limit.period.value,
            tokens=limit.tokens,
            updated_at=utc_now(),
        )
        async with self._db.engine.begin() as connection:
            await connection.execute(
                upsert.on_conflict_do_update(
                    index_elements=[_OVERRIDES.c.scope, _OVERRIDES.c.subject, _OVERRIDES.c.period],
                    set_={"tokens": upsert.excluded.tokens, "updated_at": upsert.excluded.updated_at},
                )
            )

    async def clear_budget(self, scope: BudgetScope, subject: str, period: BudgetPeriod) -> None:
        o = _OVERRIDES
        async with self._db.engine.begin() as connection:
            await connection.execute(
                delete(o).where(o.c.scope == scope.value, o.c.subject == subject, o.c.period == period.value)
            )

    async def create_key(self, record: ApiKeyRecord) -> None:
        async with self._db.engine.begin() as connection:
            await connection.execute(
                _KEYS.insert().values(
                    id=record.id,
                    user_id=record.user_id,
                    user_group=record.group,
                    name=record.name,
                    scopes=_scopes_text(record.scopes),
                    prefix=record.prefix,
                    secret_hash=record.secret_hash,
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    revoked_at=record.revoked_at,
                )
            )

    async def get_key(self, key_id: uuid.UUID) -> ApiKeyRecord | None:
        async with self._db.reader.connect() as connection:
            row = (await connection.execute(select(_KEYS).where(_KEYS.c.id == key_id))).first()
        return _to_key(row) if row is not None else None

    async def list_keys(self, user_id: str) -> Sequence[ApiKeyRecord]:
        async with self._db.reader.connect() as connection:
            rows = (
                await connection.execute(
                    select(_KEYS).where(_KEYS.c.user_id == user_id).order_by(*_NEWEST_FIRST)
                )
            ).all()
        return [_to_key(row) for row in rows]

    async def revoke_keys(
        self, user_id: str, key_id: uuid.UUID | None, now: datetime
    ) -> Sequence[ApiKeyRecord]:
        k = _KEYS
        named = [k.c.user_id == user_id] + ([k.c.id == key_id] if key_id is not None else [])
        async with self._db.engine.begin() as connection:
            await connection.execute(
                sql_update(k).where(*named, k.c.revoked_at.is_(None)).values(revoked_at=now)
            )
            rows = (await connection.execute(select(k).where(*named).order_by(*_NEWEST_FIRST))).all()
            if key_id is not None and not rows:
                raise NotFound(f"API key {key_id} not found")
        return [_to_key(row) for row in rows]
