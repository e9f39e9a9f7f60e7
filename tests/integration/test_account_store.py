"""The SQL accounting store against real databases (PostgreSQL and SQLite, migrated by Alembic): usage
records and the running totals budgets read, usage recorded with a reply, budget overrides, API keys.

Each test uses users and groups of its own, so tests share one database per backend."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from chat_service.accounting.values import (
    ApiKeyRecord,
    BudgetLimit,
    BudgetPeriod,
    BudgetScope,
    KeyScope,
    UsageEntry,
    UsageKind,
    UsageOutcome,
    UsageRow,
)
from chat_service.domain import FinishReason, HistoryStrategy
from chat_service.storage.models import UsageRecordRow
from chat_service.storage.sql import SqlAccountStore, SqlConversationStore, open_sql_store
from chatmesh.common.errors import NotFound
from tests.support.databases import fresh_postgres_database

pytestmark = pytest.mark.integration

USER_DAY = (BudgetScope.USER, BudgetPeriod.DAY)
USER_MONTH = (BudgetScope.USER, BudgetPeriod.MONTH)
GROUP_DAY = (BudgetScope.GROUP, BudgetPeriod.DAY)
GROUP_MONTH = (BudgetScope.GROUP, BudgetPeriod.MONTH)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SqlConversationStore]:
    """A migrated conversation store per backend, shared by the session."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite-accounts") / "chat.db"
        async with open_sql_store(f"sqlite+aiosqlite:///{path}", migrate=True) as sqlite_store:
            yield sqlite_store
        return
    async with (
        fresh_postgres_database("chatmesh_accounts") as url,
        open_sql_store(url, migrate=True) as pg_store,
    ):
        yield pg_store


@pytest.fixture
def accounts(store: SqlConversationStore) -> SqlAccountStore:
    """The accounting store on the same database."""
    return SqlAccountStore(store.database)


@pytest.fixture
def new_name() -> Callable[[str], str]:
    """Makes user and group names no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex}"


def entry(user: str, prompt: int, completion: int, **fields: object) -> UsageEntry:
    values: dict[str, object] = {
        "user_id": user,
        "kind": UsageKind.OPENAI,
        "model": "small",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "outcome": UsageOutcome.STOP,
    } | fields
    return UsageEntry(**values)  # type: ignore[arg-type]


async def records_of(store: SqlConversationStore, user: str) -> list[UsageRecordRow]:
    """The user's usage records, read in SQL rather than through the store under test."""
    async with store.database.sessions() as session:
        rows = await session.scalars(select(UsageRecordRow).where(UsageRecordRow.user_id == user))
        return list(rows.all())


async def test_usage_adds_up_in_the_totals_of_the_user(
    accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    user = new_name("user")
    assert (await accounts.budget_use(user, "", datetime.now(UTC))).used == {}
    assert await accounts.record_usage(entry(user, 10, 5))
    assert await accounts.record_usage(entry(user, 7, 3, cached_tokens=40, outcome=UsageOutcome.CACHED))
    use = await accounts.budget_use(user, "", datetime.now(UTC))
    assert use.used == {USER_DAY: 25, USER_MONTH: 25}, "cached tokens are charged nothing"
    assert use.overrides == {}
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    later = await accounts.budget_use(user, "", tomorrow)
    assert later.used.get(USER_DAY, 0) == 0, "a new day starts from nothing"


async def test_concurrent_records_of_one_user_all_count(
    accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    user = new_name("user")
    await asyncio.gather(*(accounts.record_usage(entry(user, 1, 2)) for _ in range(10)))
    assert (await accounts.budget_use(user, "", datetime.now(UTC))).used == {USER_DAY: 30, USER_MONTH: 30}


async def test_a_request_key_is_recorded_once_per_user(
    store: SqlConversationStore, accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    user, other = new_name("user"), new_name("user")
    assert await accounts.record_usage(entry(user, 10, 5, request_key="req-1"))
    assert not await accounts.record_usage(entry(user, 10, 5, request_key="req-1")), "a retry"
    assert await accounts.record_usage(entry(other, 1, 1, request_key="req-1")), "keys are per user"
    assert await accounts.record_usage(entry(user, 1, 1)), "no key: always recorded"
    assert await accounts.record_usage(entry(user, 1, 1))
    assert len(await records_of(store, user)) == 3
    assert (await accounts.budget_use(user, "", datetime.now(UTC))).used[USER_DAY] == 19


async def test_usage_is_charged_to_the_group_last_noted(
    store: SqlConversationStore, accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    user, first, second = new_name("user"), new_name("group"), new_name("group")
    await accounts.record_usage(entry(user, 1, 1))
    await accounts.note_member(user, first)
    await accounts.note_member(user, first)
    await accounts.record_usage(entry(user, 10, 0))
    await accounts.note_member(user, second)
    await accounts.record_usage(entry(user, 100, 0))
    await accounts.note_member(user, "")
    await accounts.record_usage(entry(user, 1000, 0))
    now = datetime.now(UTC)
    assert (await accounts.budget_use(user, first, now)).used == {
        USER_DAY: 1112,
        USER_MONTH: 1112,
        GROUP_DAY: 10,
        GROUP_MONTH: 10,
    }
    assert (await accounts.budget_use(user, second, now)).used[GROUP_MONTH] == 100
    assert sorted(r.user_group for r in await records_of(store, user)) == sorted(["", first, second, ""])


async def test_a_reply_records_its_usage_once(
    store: SqlConversationStore, accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    user, group = new_name("user"), new_name("group")
    await accounts.note_member(user, group)
    chat, _ = await store.create_chat(user, "", "", HistoryStrategy.FULL)
    question, _ = await store.add_user_message(user, chat.id, "Hi", 1, None)
    usage = entry(user, 12, 3, kind=UsageKind.CHAT, ttft_ms=4.5, duration_ms=20.0)
    reply, created = await store.add_assistant_message(
        user, chat.id, question.id, "Hello", 3, FinishReason.STOP, usage=usage
    )
    again, created_again = await store.add_assistant_message(
        user, chat.id, question.id, "Hello", 3, FinishReason.STOP, usage=usage
    )
    assert (created, created_again, again.id) == (True, False, reply.id)
    [record] = await records_of(store, user)
    assert (record.message_id, record.chat_id, record.user_group) == (reply.id, chat.id, group)
    assert (record.kind, record.ttft_ms, record.duration_ms, record.outcome) == ("chat", 4.5, 20.0, "stop")
    use = await accounts.budget_use(user, group, datetime.now(UTC))
    assert use.used == {USER_DAY: 15, USER_MONTH: 15, GROUP_DAY: 15, GROUP_MONTH: 15}


async def test_a_reply_to_a_missing_question_records_no_usage(
    store: SqlConversationStore, new_name: Callable[[str], str]
) -> None:
    user = new_name("user")
    chat, _ = await store.create_chat(user, "", "", HistoryStrategy.FULL)
    with pytest.raises(NotFound):
        await store.add_assistant_message(
            user, chat.id, uuid.uuid4(), "Hello", 3, FinishReason.STOP, usage=entry(user, 1, 1)
        )
    assert await records_of(store, user) == []


async def test_a_deleted_chat_keeps_its_usage(
    store: SqlConversationStore, accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    user = new_name("user")
    chat, _ = await store.create_chat(user, "", "", HistoryStrategy.FULL)
    question, _ = await store.add_user_message(user, chat.id, "Hi", 1, None)
    await store.add_assistant_message(
        user, chat.id, question.id, "Hello", 3, FinishReason.STOP, usage=entry(user, 5, 3)
    )
    await store.delete_chat(user, chat.id)
    assert [r.chat_id for r in await records_of(store, user)] == [chat.id]
    assert (await accounts.budget_use(user, "", datetime.now(UTC))).used[USER_MONTH] == 8
    today = datetime.now(UTC).date()
    assert [r.requests for r in await accounts.usage_rows(today, user_id=user)] == [1]


async def test_usage_rows_by_day_and_model_and_by_user(
    accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    alice, bob, group = new_name("alice"), new_name("bob"), new_name("group")
    await accounts.note_member(alice, group)
    await accounts.note_member(bob, group)
    await accounts.record_usage(entry(alice, 10, 1, model="small"))
    await accounts.record_usage(entry(alice, 20, 2, model="small", cached_tokens=5))
    await accounts.record_usage(entry(alice, 30, 3, model="big"))
    await accounts.record_usage(entry(bob, 40, 4, model="small"))
    today = datetime.now(UTC).date()
    assert list(await accounts.usage_rows(today, user_id=alice)) == [
        UsageRow(today, "big", 30, 3, 0, 1),
        UsageRow(today, "small", 30, 3, 5, 2),
    ]
    assert list(await accounts.usage_rows(today, group=group)) == [
        UsageRow(today, "big", 30, 3, 0, 1),
        UsageRow(today, "small", 70, 7, 5, 3),
    ]
    by_user = await accounts.usage_rows(today, group=group, by_user=True)
    assert sorted(by_user, key=lambda r: (r.model, r.user_id)) == [
        UsageRow(today, "big", 30, 3, 0, 1, alice, group),
        UsageRow(today, "small", 30, 3, 5, 2, alice, group),
        UsageRow(today, "small", 40, 4, 0, 1, bob, group),
    ]
    team = await accounts.usage_rows(today, by_user=True)
    assert {r.user_id for r in team} >= {alice, bob}, "the team view holds everyone's"
    assert list(await accounts.usage_rows(today + timedelta(days=1), user_id=alice)) == []


async def test_budget_overrides_set_replace_and_clear(
    accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    user, group = new_name("user"), new_name("group")
    await accounts.set_budget(BudgetLimit(BudgetScope.USER, user, BudgetPeriod.DAY, 100))
    await accounts.set_budget(BudgetLimit(BudgetScope.USER, user, BudgetPeriod.DAY, 250))
    await accounts.set_budget(BudgetLimit(BudgetScope.GROUP, group, BudgetPeriod.MONTH, 0))
    use = await accounts.budget_use(user, group, datetime.now(UTC))
    assert use.overrides == {USER_DAY: 250, GROUP_MONTH: 0}
    mine = [o for o in await accounts.budget_overrides() if o.subject in (user, group)]
    assert mine == [
        BudgetLimit(BudgetScope.GROUP, group, BudgetPeriod.MONTH, 0, overridden=True),
        BudgetLimit(BudgetScope.USER, user, BudgetPeriod.DAY, 250, overridden=True),
    ]
    assert (await accounts.budget_use(user, "", datetime.now(UTC))).overrides == {USER_DAY: 250}
    await accounts.clear_budget(BudgetScope.USER, user, BudgetPeriod.DAY)
    await accounts.clear_budget(BudgetScope.USER, user, BudgetPeriod.MONTH)  # none: nothing happens
    assert (await accounts.budget_use(user, group, datetime.now(UTC))).overrides == {GROUP_MONTH: 0}


def key(user: str, group: str = "", *, created_at: datetime, **fields: object) -> ApiKeyRecord:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "user_id": user,
        "group": group,
        "name": "laptop",
        "scopes": frozenset({KeyScope.CHAT, KeyScope.USAGE}),
        "prefix": "cmk_ab12",
        "secret_hash": uuid.uuid4().hex * 2,
        "created_at": created_at,
    } | fields
    return ApiKeyRecord(**values)  # type: ignore[arg-type]


async def test_api_keys_create_get_list_and_revoke(
    accounts: SqlAccountStore, new_name: Callable[[str], str]
) -> None:
    user, other = new_name("user"), new_name("user")
    now = datetime.now(UTC).replace(microsecond=0)
    old = key(user, "team", created_at=now - timedelta(hours=2), expires_at=now + timedelta(days=30))
    new = key(user, created_at=now - timedelta(hours=1), scopes=frozenset(), name="ci")
    theirs = key(other, created_at=now)
    for record in (old, new, theirs):
        await accounts.create_key(record)
    assert await accounts.get_key(old.id) == old
    assert await accounts.get_key(new.id) == new, "a key made with no scopes"
    assert await accounts.get_key(uuid.uuid4()) is None
    assert list(await accounts.list_keys(user)) == [new, old], "newest first"

    with pytest.raises(NotFound):
        await accounts.revoke_keys(user, theirs.id, now)
    assert (await accounts.get_key(theirs.id)) == theirs, "another user's key is untouched"

    [revoked] = await accounts.revoke_keys(user, old.id, now)
    assert revoked.id == old.id and revoked.revoked_at == now and not revoked.usable(now)
    later = now + timedelta(minutes=5)
    [again] = await accounts.revoke_keys(user, old.id, later)
    assert again.revoked_at == now, "revoking again keeps when it was revoked"

    everything = await accounts.revoke_keys(user, None, later)
    assert [(k.id, k.revoked_at) for k in everything] == [(new.id, later), (old.id, now)]
    assert [k.revoked_at for k in await accounts.list_keys(user)] == [later, now]
    assert await accounts.get_key(theirs.id) == theirs, "revoking all of a user's keys revokes only theirs"
    assert list(await accounts.revoke_keys(new_name("user"), None, later)) == []
