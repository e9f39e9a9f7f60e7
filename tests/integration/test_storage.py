"""The SQL conversation store against real databases: one suite, run on PostgreSQL and on SQLite.

PostgreSQL: 127.0.0.1:5432, user `postgres` with trust auth; a fresh database is created for the session
(through the existing `test` database) and dropped at the end. SQLite: a file under pytest's tmp dir.
Both schemas are created by the Alembic migrations, through `open_sql_store(..., migrate=True)`.
Each test works with users of its own, so tests share one database per backend without interfering.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, func, select, text
from sqlalchemy import update as sql_update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from chat_service.domain import (
    ChatCursor,
    ChatUpdate,
    FinishReason,
    HistoryStrategy,
    JobRequest,
    JobState,
    Message,
    Role,
)
from chat_service.storage.base import NOT_COUNTED, Lease, ReplyClaim
from chat_service.storage.migrate import alembic_config, upgrade_to_head
from chat_service.storage.models import Base, ChatRow, MessageRow
from chat_service.storage.sql import (
    TITLE_MAX_CHARS,
    SqlConversationStore,
    SqlJobStore,
    open_sql_store,
    title_from_content,
)
from chatmesh.common.errors import NotFound
from tests.support.databases import fresh_postgres_database

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SqlConversationStore]:
    """A migrated store per backend, shared by the session."""
    if request.param == "sqlite":
        # A directory that does not exist yet: opening the store must create it.
        path = tmp_path_factory.mktemp("sqlite") / "not-yet" / "chat.db"
        async with open_sql_store(f"sqlite+aiosqlite:///{path}", migrate=True) as sqlite_store:
            yield sqlite_store
        return
    async with (
        fresh_postgres_database("chatmesh_storage") as url,
        open_sql_store(url, migrate=True) as pg_store,
    ):
        yield pg_store


@pytest.fixture
def jobs(store: SqlConversationStore) -> SqlJobStore:
    """The job store on the same database."""
    return SqlJobStore(store.database)


@pytest.fixture
def new_user() -> Callable[[], str]:
    """Makes user ids no other test uses."""
    return lambda: f"user-{uuid.uuid4().hex}"


async def count_messages(store: SqlConversationStore, chat_id: uuid.UUID) -> int:
    """Message rows of the chat, counted in SQL rather than through the store under test."""
    async with store.engine.connect() as connection:
        count = await connection.scalar(
            select(func.count()).select_from(MessageRow).where(MessageRow.chat_id == chat_id)
        )
    return int(count or 0)


async def new_chat(store: SqlConversationStore, user: str, title: str = "") -> uuid.UUID:
    chat, _ = await store.create_chat(user, title, "You are terse.", HistoryStrategy.FULL)
    return chat.id


async def add_turns(store: SqlConversationStore, user: str, chat_id: uuid.UUID, turns: int) -> list[Message]:
    """`turns` question/answer pairs, in order."""
    stored: list[Message] = []
    for i in range(turns):
        question, _ = await store.add_user_message(user, chat_id, f"question {i}", 3, None)
        answer, _ = await store.add_assistant_message(
            user, chat_id, question.id, f"answer {i}", 2, FinishReason.STOP
        )
        stored += [question, answer]
    return stored


async def test_a_chats_model_and_its_replies_models_are_kept(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    chat, _ = await store.create_chat(user, "", "", HistoryStrategy.FULL, model="small")
    assert chat.model == "small"
    assert (await store.get_chat(user, chat.id)).model == "small"
    turn = await store.start_turn(user, chat.id, "Hi", None)
    assert turn.chat.model == "small", "the turn reads the chat's model with it"
    reply, _ = await store.add_assistant_message(
        user, chat.id, turn.message.id, "Hello", 1, FinishReason.STOP, model="small"
    )
    assert reply.model == "small" and turn.message.model is None
    updated = await store.update_chat(user, chat.id, ChatUpdate(model="big"))
    assert (updated.model, updated.title) == ("big", "Hi"), "only the model changed"
    assert [c.model for c in await store.list_chats(user, 10, None)] == ["big"]
    assert [m.model for m in await store.history(user, chat.id)] == [None, "small"]
    assert (await store.find_reply(user, turn.message.id)) == reply
    stored = await store.stored_turn(user, turn.message.id)
    assert stored.chat.model == "big"
    unnamed, _ = await store.create_chat(user, "", "", HistoryStrategy.FULL)
    assert unnamed.model == "", "the deployment's default"


async def test_create_get_update_delete(store: SqlConversationStore, new_user: Callable[[], str]) -> None:
    user = new_user()
    before = datetime.now(UTC)
    chat, created = await store.create_chat(user, "Trip", "Be brief.", HistoryStrategy.WINDOW)
    assert created
    assert (chat.user_id, chat.title, chat.system_prompt, chat.history_strategy) == (
        user,
        "Trip",
        "Be brief.",
        HistoryStrategy.WINDOW,
    )
    assert chat.created_at == chat.last_activity_at
    assert before <= chat.created_at <= datetime.now(UTC)

    fetched = await store.get_chat(user, chat.id)
    assert fetched == chat
    # Read back from the database (SQLite stores naive text): still aware, still UTC.
    assert fetched.created_at.utcoffset() == timedelta(0)
    assert fetched.last_activity_at.tzinfo is not None

    updated = await store.update_chat(
        user, chat.id, ChatUpdate(title="Trip to Rome", history_strategy=HistoryStrategy.SUMMARY)
    )
    assert (updated.title, updated.system_prompt, updated.history_strategy) == (
        "Trip to Rome",
        "Be brief.",
        HistoryStrategy.SUMMARY,
    )
    assert await store.get_chat(user, chat.id) == updated
    assert await store.update_chat(user, chat.id, ChatUpdate()) == updated
    updated = await store.update_chat(user, chat.id, ChatUpdate(system_prompt="Be verbose."))
    assert updated.system_prompt == "Be verbose."
    assert updated.title == "Trip to Rome"

    assert [c.id for c in await store.list_chats(user, 10, None)] == [chat.id]
    await store.delete_chat(user, chat.id)
    with pytest.raises(NotFound, match=f"chat {chat.id} not found"):
        await store.get_chat(user, chat.id)
    assert await store.list_chats(user, 10, None) == []
    with pytest.raises(NotFound):
        await store.delete_chat(user, chat.id)
    with pytest.raises(NotFound):
        await store.update_chat(user, chat.id, ChatUpdate(title="x"))


async def test_another_users_chat_is_indistinguishable_from_a_missing_one(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    alice, bob = new_user(), new_user()
    chat_id = await new_chat(store, alice)
    [question, answer] = await add_turns(store, alice, chat_id, 1)
    await store.save_summary(alice, answer.id, "Alice asked; we answered.")
    bob_chat = await new_chat(store, bob)

    missing = uuid.uuid4()
    attempts: dict[str, Callable[[uuid.UUID], Any]] = {
        "get_chat": lambda c: store.get_chat(bob, c),
        "update_chat": lambda c: store.update_chat(bob, c, ChatUpdate(title="mine now")),
        "delete_chat": lambda c: store.delete_chat(bob, c),
        "add_user_message": lambda c: store.add_user_message(bob, c, "hello", 1, "bob-1"),
        "add_assistant_message": lambda c: store.add_assistant_message(
            bob, c, question.id, "hi", 1, FinishReason.STOP
        ),
        "messages_page": lambda c: store.messages_page(bob, c, 10, None),
        "history": lambda c: store.history(bob, c),
        "latest_summary": lambda c: store.latest_summary(bob, c),
    }
    for method, attempt in attempts.items():
        with pytest.raises(NotFound) as foreign:
            await attempt(chat_id)
        with pytest.raises(NotFound) as absent:
            await attempt(missing)
        # Same message shape either way: nothing tells Bob that Alice's chat exists.
        assert str(foreign.value) == f"chat {chat_id} not found", method
        assert str(absent.value) == f"chat {missing} not found", method

    with pytest.raises(NotFound, match=f"message {answer.id} not found"):
        await store.save_summary(bob, answer.id, "overwritten")
    assert await store.find_reply(bob, question.id) is None
    assert [c.id for c in await store.list_chats(bob, 100, None)] == [bob_chat]

    # Bob's attempts changed nothing of Alice's.
    chat = await store.get_chat(alice, chat_id)
    assert chat.title == "question 0"
    assert [m.id for m in await store.history(alice, chat_id)] == [question.id, answer.id]
    summary = await store.latest_summary(alice, chat_id)
    assert summary is not None
    assert summary.summary == "Alice asked; we answered."
    # Nor can Bob attach a reply to Alice's message through his own chat.
    with pytest.raises(NotFound, match=f"message {question.id} not found"):
        await store.add_assistant_message(bob, bob_chat, question.id, "hi", 1, FinishReason.STOP)


async def test_list_orders_by_activity_and_pages_without_gaps_or_duplicates(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user, other = new_user(), new_user()
    created = [await new_chat(store, user, f"chat {i}") for i in range(7)]
    await new_chat(store, other)
    # Activity, not creation, orders the list: the oldest chat moves to the front.
    await store.add_user_message(user, created[0], "back to this one", 1, None)
    expected = [created[0], *reversed(created[1:])]

    listed = await store.list_chats(user, 100, None)
    assert [c.id for c in listed] == expected
    activity = [c.last_activity_at for c in listed]
    assert activity == sorted(activity, reverse=True)

    for limit in (1, 3, 7):
        paged: list[uuid.UUID] = []
        cursor: ChatCursor | None = None
        while page := await store.list_chats(user, limit, cursor):
            assert len(page) <= limit
            paged += [c.id for c in page]
            cursor = ChatCursor(page[-1].last_activity_at, page[-1].id)
        assert paged == expected, limit
    assert await store.list_chats(user, 0, None) == []


async def test_list_pages_through_chats_with_equal_activity_times(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    ids = [await new_chat(store, user) for _ in range(9)]
    # Ties on the timestamp are broken by id, so the keyset cursor still neither repeats nor skips.
    same = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    async with store.engine.begin() as connection:
        await connection.execute(
            sql_update(ChatRow).where(ChatRow.id.in_(ids[:6])).values(last_activity_at=same)
        )
    expected = [c.id for c in await store.list_chats(user, 100, None)]
    assert sorted(expected) == sorted(ids)
    assert expected[3:] == sorted(ids[:6], reverse=True)

    paged: list[uuid.UUID] = []
    cursor: ChatCursor | None = None
    while page := await store.list_chats(user, 2, cursor):
        paged += [c.id for c in page]
        cursor = ChatCursor(page[-1].last_activity_at, page[-1].id)
    assert paged == expected


async def test_messages_page_and_history(store: SqlConversationStore, new_user: Callable[[], str]) -> None:
    user = new_user()
    chat_id = await new_chat(store, user)
    assert await store.messages_page(user, chat_id, 10, None) == []
    assert await store.history(user, chat_id) == []
    stored = await add_turns(store, user, chat_id, 4)
    other_chat = await new_chat(store, user)
    await add_turns(store, user, other_chat, 2)

    assert [m.role for m in stored] == [Role.USER, Role.ASSISTANT] * 4
    seqs = [m.seq for m in stored]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)

    history = await store.history(user, chat_id)
    assert history == stored
    assert await store.history(user, chat_id, after_seq=stored[4].seq) == stored[5:]

    paged: list[Message] = []
    after: int | None = None
    while page := await store.messages_page(user, chat_id, 3, after):
        assert len(page) <= 3
        paged += page
        after = page[-1].seq
    assert paged == stored
    assert await store.messages_page(user, chat_id, 0, None) == []

    answer = stored[1]
    assert answer.reply_to == stored[0].id
    assert answer.finish_reason is FinishReason.STOP
    assert answer.created_at.utcoffset() == timedelta(0)
    assert await store.find_reply(user, stored[0].id) == answer


async def test_title_comes_from_the_first_message(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    untitled = await new_chat(store, user)
    first = "  Plan a  three-day trip to Rome \nwith kids, on a budget"
    _, created = await store.add_user_message(user, untitled, first, 12, "q1")
    assert created
    chat = await store.get_chat(user, untitled)
    assert chat.title == "Plan a three-day trip to Rome"
    assert chat.last_activity_at > chat.created_at
    await store.add_user_message(user, untitled, "Another question", 2, "q2")
    assert (await store.get_chat(user, untitled)).title == "Plan a three-day trip to Rome"

    titled = await new_chat(store, user, title="Rome")
    await store.add_user_message(user, titled, "Plan a trip", 3, None)
    assert (await store.get_chat(user, titled)).title == "Rome"

    long_chat = await new_chat(store, user)
    await store.add_user_message(user, long_chat, "word " * 40, 40, None)
    title = (await store.get_chat(user, long_chat)).title
    assert title.endswith("…")
    assert len(title) <= TITLE_MAX_CHARS


def test_title_from_content_cuts_at_a_word_boundary() -> None:
    assert title_from_content("\n\n  Hello   world \n second line") == "Hello world"
    assert title_from_content("   \n ") == ""
    exact = "x" * TITLE_MAX_CHARS
    assert title_from_content(exact) == exact
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho"
    title = title_from_content(words)
    assert len(title) <= TITLE_MAX_CHARS
    assert title.endswith("…")
    assert words.startswith(title.removesuffix("…") + " ")
    hard = title_from_content("y" * 200)
    assert hard == "y" * (TITLE_MAX_CHARS - 1) + "…"


async def test_create_chat_is_idempotent_on_request_id(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user, other = new_user(), new_user()
    first, created = await store.create_chat(user, "A", "", HistoryStrategy.FULL, "req-1")
    again, created_again = await store.create_chat(user, "B", "different", HistoryStrategy.WINDOW, "req-1")
    assert created and not created_again
    assert again == first
    # The key is per user, and chats without a request id are never deduplicated.
    theirs, theirs_created = await store.create_chat(other, "A", "", HistoryStrategy.FULL, "req-1")
    assert theirs_created and theirs.id != first.id
    a, _ = await store.create_chat(user, "A", "", HistoryStrategy.FULL)
    b, _ = await store.create_chat(user, "A", "", HistoryStrategy.FULL)
    assert a.id != b.id

    racing = await asyncio.gather(
        *(store.create_chat(user, "race", "", HistoryStrategy.FULL, "req-race") for _ in range(10))
    )
    assert sum(created for _, created in racing) == 1
    assert len({chat.id for chat, _ in racing}) == 1
    assert len(await store.list_chats(user, 100, None)) == 4


async def test_add_user_message_is_idempotent_even_under_concurrency(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    chat_id = await new_chat(store, user)
    first, created = await store.add_user_message(user, chat_id, "hello", 1, "retry-me")
    again, created_again = await store.add_user_message(user, chat_id, "hello", 1, "retry-me")
    assert created and not created_again
    assert again == first
    assert await count_messages(store, chat_id) == 1

    racing = await asyncio.gather(
        *(store.add_user_message(user, chat_id, "same question", 2, "racing") for _ in range(10))
    )
    assert sum(created for _, created in racing) == 1
    assert len({message.id for message, _ in racing}) == 1
    assert await count_messages(store, chat_id) == 2

    # The same request id in another chat is another message.
    elsewhere = await new_chat(store, user)
    _, created_elsewhere = await store.add_user_message(user, elsewhere, "hello", 1, "retry-me")
    assert created_elsewhere


async def test_add_assistant_message_is_idempotent_on_reply_to(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    chat_id = await new_chat(store, user)
    question, _ = await store.add_user_message(user, chat_id, "hi", 1, None)
    assert await store.find_reply(user, question.id) is None
    racing = await asyncio.gather(
        *(
            store.add_assistant_message(user, chat_id, question.id, f"reply {i}", 2, FinishReason.LENGTH)
            for i in range(10)
        )
    )
    assert sum(created for _, created in racing) == 1
    replies = {message for message, _ in racing}
    assert len(replies) == 1
    [reply] = replies
    assert (reply.role, reply.reply_to, reply.finish_reason) == (
        Role.ASSISTANT,
        question.id,
        FinishReason.LENGTH,
    )
    assert await store.find_reply(user, question.id) == reply
    again, created = await store.add_assistant_message(
        user, chat_id, question.id, "late", 1, FinishReason.STOP
    )
    assert again == reply and not created
    assert await count_messages(store, chat_id) == 2

    # A reply must answer a user message of this chat.
    with pytest.raises(NotFound, match=f"message {reply.id} not found"):
        await store.add_assistant_message(user, chat_id, reply.id, "x", 1, FinishReason.STOP)
    other_chat = await new_chat(store, user)
    with pytest.raises(NotFound, match=f"message {question.id} not found"):
        await store.add_assistant_message(user, other_chat, question.id, "x", 1, FinishReason.STOP)
    assert await count_messages(store, other_chat) == 0


async def test_a_turn_is_stored_before_its_count_and_the_count_is_recorded_later(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user, bob = new_user(), new_user()
    chat_id = await new_chat(store, user)
    earlier = await add_turns(store, user, chat_id, 1)
    turn = await store.start_turn(user, chat_id, "How many tokens am I?", "count-me")
    assert turn.created and turn.message.token_count == NOT_COUNTED
    assert [m.id for m in turn.history] == [*(m.id for m in earlier), turn.message.id]
    retried = await store.start_turn(user, chat_id, "How many tokens am I?", "count-me")
    assert not retried.created and retried.message.id == turn.message.id and retried.history == []

    # With the reply, in its transaction; a second reply records nothing.
    await store.add_assistant_message(
        user, chat_id, turn.message.id, "Seven.", 2, FinishReason.STOP, 9, question_tokens=7
    )
    await store.add_assistant_message(
        user, chat_id, turn.message.id, "late", 1, FinishReason.STOP, 9, question_tokens=70
    )
    stored = {m.id: m for m in await store.history(user, chat_id)}
    assert stored[turn.message.id].token_count == 7
    assert stored[earlier[0].id].token_count == earlier[0].token_count

    # Without a reply (the turn failed), on its own; only for the message's owner.
    unanswered = await store.start_turn(user, chat_id, "And me?", None, with_history=False)
    assert unanswered.history == [unanswered.message]
    with pytest.raises(NotFound):
        await store.record_token_count(bob, unanswered.message.id, 5)
    await store.record_token_count(user, unanswered.message.id, 5)
    assert (await store.history(user, chat_id))[-1].token_count == 5


async def test_summary_is_saved_and_the_latest_one_is_found(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    chat_id = await new_chat(store, user)
    messages = await add_turns(store, user, chat_id, 3)
    assert await store.latest_summary(user, chat_id) is None
    await store.save_summary(user, messages[1].id, "first two")
    await store.save_summary(user, messages[3].id, "first four")
    latest = await store.latest_summary(user, chat_id)
    assert latest is not None
    assert (latest.id, latest.summary) == (messages[3].id, "first four")
    assert [m.summary for m in await store.history(user, chat_id)] == [
        None,
        "first two",
        None,
        "first four",
        None,
        None,
    ]
    with pytest.raises(NotFound):
        await store.save_summary(user, uuid.uuid4(), "nothing")


async def test_delete_removes_the_messages_too(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    doomed, kept = await new_chat(store, user), await new_chat(store, user)
    await add_turns(store, user, doomed, 3)
    await add_turns(store, user, kept, 1)
    assert await count_messages(store, doomed) == 6
    await store.delete_chat(user, doomed)
    assert await count_messages(store, doomed) == 0
    assert await count_messages(store, kept) == 2
    with pytest.raises(NotFound):
        await store.history(user, doomed)
    with pytest.raises(NotFound):
        await store.add_user_message(user, doomed, "anyone there?", 1, None)
    assert [c.id for c in await store.list_chats(user, 10, None)] == [kept]


async def test_migrations_are_idempotent_and_match_the_models(store: SqlConversationStore) -> None:
    await upgrade_to_head(store.engine)
    await upgrade_to_head(store.engine)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()

    def inspect(connection: Connection) -> tuple[str | None, list[Any]]:
        context = MigrationContext.configure(connection)
        return context.get_current_revision(), compare_metadata(context, Base.metadata)

    async with store.engine.connect() as connection:
        revision, differences = await connection.run_sync(inspect)
    assert revision == head == "0008"
    # The hand-written revision creates exactly what the models declare.
    assert differences == []


async def test_sqlite_enforces_foreign_keys_in_wal_mode(store: SqlConversationStore) -> None:
    if store.engine.dialect.name != "sqlite":
        pytest.skip("SQLite connection settings")
    async with store.engine.connect() as connection:
        assert await connection.scalar(text("PRAGMA foreign_keys")) == 1
        assert await connection.scalar(text("PRAGMA journal_mode")) == "wal"


async def explain(store: SqlConversationStore, call: Callable[[], Any], table: str) -> str:
    """The database's plan for the SELECT on `table` that `call` runs through the store."""
    captured: list[tuple[str, Any]] = []

    def capture(connection: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and f"FROM {table}" in statement:
            captured.append((statement, parameters))

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await call()
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    statement, parameters = captured[0]
    async with store.engine.connect() as connection:
        if store.engine.dialect.name == "sqlite":
            rows = await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
            return "\n".join(str(row[-1]) for row in rows)
        # The test tables are tiny, where a sequential scan is cheapest; forbidding the alternatives shows
        # whether the index matches the query (conditions and order), which is what this test is about.
        # benchmarks/storage_queries.py shows the planner's free choice on realistic volumes.
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            await connection.exec_driver_sql(f"SET LOCAL {setting} = off")
        rows = await connection.exec_driver_sql("EXPLAIN " + statement, parameters)
        return "\n".join(str(row[0]) for row in rows)


async def test_list_and_history_are_index_scans(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    chats = [await store.create_chat(user, f"c{i}", "", HistoryStrategy.FULL) for i in range(5)]
    await add_turns(store, user, chats[0][0].id, 3)
    cursor = ChatCursor(chats[2][0].last_activity_at, chats[2][0].id)
    chat_id = chats[0][0].id

    plans = {
        "list": await explain(store, lambda: store.list_chats(user, 20, cursor), "chats"),
        "page": await explain(store, lambda: store.messages_page(user, chat_id, 50, 1), "messages"),
        "history": await explain(store, lambda: store.history(user, chat_id), "messages"),
    }
    if store.engine.dialect.name == "sqlite":
        assert (
            "USING INDEX ix_chats_user_activity (user_id=? AND (last_activity_at,id)<(?,?))" in plans["list"]
        )
        assert "USING INDEX ix_messages_chat_seq (chat_id=? AND seq>?)" in plans["page"]
        assert "USING INDEX ix_messages_chat_seq (chat_id=?)" in plans["history"]
        assert all("TEMP B-TREE" not in plan for plan in plans.values()), plans
        return
    assert "Index Scan Backward using ix_chats_user_activity" in plans["list"], plans["list"]
    assert "ROW(last_activity_at, id) < ROW(" in plans["list"], plans["list"]
    assert "Index Scan using ix_messages_chat_seq" in plans["page"], plans["page"]
    assert "seq > " in plans["page"], plans["page"]
    assert "Index Scan using ix_messages_chat_seq" in plans["history"], plans["history"]
    assert all("Sort" not in plan for plan in plans.values()), plans


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_upgrade_keeps_rows_written_by_an_older_schema(backend: str, tmp_path: Path) -> None:
    """A database created at revision 0001 with data in it upgrades to head with nothing lost."""
    async with contextlib.AsyncExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        else:
            url = await stack.enter_async_context(fresh_postgres_database())
        engine = create_async_engine(url)
        chat_id, question_id, reply_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        now = datetime.now(UTC)

        def upgrade_to_0001(connection: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            alembic_command.upgrade(config, "0001")

        async with engine.begin() as connection:
            await connection.run_sync(upgrade_to_0001)
            await connection.execute(
                text(
                    "INSERT INTO chats (id, user_id, title, system_prompt, history_strategy, created_at,"
                    " last_activity_at) VALUES (:id, 'old-user', 'old chat', '', 'full', :now, :now)"
                ),
                {"id": chat_id if backend == "postgresql" else chat_id.hex, "now": now},
            )
            for message_id, role, reply_to in [
                (question_id, "user", None),
                (reply_id, "assistant", question_id),
            ]:
                await connection.execute(
                    text(
                        "INSERT INTO messages (id, chat_id, user_id, role, content, token_count,"
                        " finish_reason, reply_to, created_at)"
                        " VALUES (:id, :chat, 'old-user', :role, :content, 3, :finish, :reply_to, :now)"
                    ),
                    {
                        "id": message_id if backend == "postgresql" else message_id.hex,
                        "chat": chat_id if backend == "postgresql" else chat_id.hex,
                        "role": role,
                        "content": f"{role} text",
                        "finish": "stop" if role == "assistant" else None,
                        "reply_to": reply_to if backend == "postgresql" or reply_to is None else reply_to.hex,
                        "now": now,
                    },
                )
        await engine.dispose()

        async with open_sql_store(url, migrate=True) as upgraded:
            history = await upgraded.history("old-user", chat_id)
            assert [(m.id, m.content, m.prompt_tokens) for m in history] == [
                (question_id, "user text", None),
                (reply_id, "assistant text", None),
            ]
            question, _ = await upgraded.add_user_message("old-user", chat_id, "new", 1, None)
            reply, _ = await upgraded.add_assistant_message(
                "old-user", chat_id, question.id, "new reply", 2, FinishReason.STOP, prompt_tokens=42
            )
            assert (await upgraded.find_reply("old-user", question.id)) == reply
            assert reply.prompt_tokens == 42
            # Migration 0007: the chat follows the deployment's default model, its old reply names none.
            assert (await upgraded.get_chat("old-user", chat_id)).model == ""
            assert [m.model for m in history] == [None, None]


# -- jobs ----------------------------------------------------------------------------------------------


def job_request(user: str, chat_id: uuid.UUID, message: Message) -> JobRequest:
    return JobRequest(user, chat_id, message.id, 32, 0.0, None, 7, True)


async def test_a_job_is_created_once_per_message_and_read_only_by_its_owner(
    store: SqlConversationStore, jobs: SqlJobStore, new_user: Callable[[], str]
) -> None:
    user, other = new_user(), new_user()
    chat_id = await new_chat(store, user)
    message, _ = await store.add_user_message(user, chat_id, "later, please", NOT_COUNTED, "req-1")
    job, created = await jobs.create_job(job_request(user, chat_id, message))
    again, created_again = await jobs.create_job(job_request(user, chat_id, message))
    assert (created, created_again) == (True, False)
    assert again == job
    assert (job.state, job.attempts, job.error) == (JobState.QUEUED, 0, None)
    assert job.request == job_request(user, chat_id, message)

    assert await jobs.get_job(user, job.id) == job
    with pytest.raises(NotFound):
        await jobs.get_job(other, job.id)
    with pytest.raises(NotFound):
        # Nobody can queue a job on another user's message.
        await jobs.create_job(job_request(other, chat_id, message))

    await jobs.update_job(job.id, JobState.FAILED, 3, "the engine kept failing")
    failed = await jobs.get_job(user, job.id)
    assert (failed.state, failed.attempts, failed.error) == (JobState.FAILED, 3, "the engine kept failing")
    assert failed.updated_at >= job.updated_at
    assert await jobs.load_job(job.id) == failed


@pytest.mark.parametrize("seed", [0, 2**63 - 1, 2**63, 2**64 - 1])
async def test_a_job_keeps_any_uint64_seed(
    store: SqlConversationStore, jobs: SqlJobStore, new_user: Callable[[], str], seed: int
) -> None:
    """The contract's seed is uint64; both databases' integers are signed 64-bit."""
    user = new_user()
    chat_id = await new_chat(store, user)
    message, _ = await store.add_user_message(user, chat_id, "seeded", NOT_COUNTED, None)
    job, _ = await jobs.create_job(dataclasses.replace(job_request(user, chat_id, message), seed=seed))
    assert (await jobs.get_job(user, job.id)).request.seed == seed
    assert (await jobs.load_job(job.id)) == job


async def test_jobs_die_with_their_chat(
    store: SqlConversationStore, jobs: SqlJobStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    chat_id = await new_chat(store, user)
    message, _ = await store.add_user_message(user, chat_id, "later, please", NOT_COUNTED, None)
    job, _ = await jobs.create_job(job_request(user, chat_id, message))
    await store.delete_chat(user, chat_id)
    assert await jobs.load_job(job.id) is None


async def test_a_discarded_job_leaves_no_unanswered_message(
    store: SqlConversationStore, jobs: SqlJobStore, new_user: Callable[[], str]
) -> None:
    user = new_user()
    chat_id = await new_chat(store, user)
    kept = await add_turns(store, user, chat_id, 1)
    message, _ = await store.add_user_message(user, chat_id, "refused", NOT_COUNTED, "req-2")
    job, _ = await jobs.create_job(job_request(user, chat_id, message))
    await jobs.discard_job(job)
    assert await jobs.load_job(job.id) is None
    assert [m.id for m in await store.history(user, chat_id)] == [m.id for m in kept]
    # The same request can be submitted again from scratch.
    again, created = await store.add_user_message(user, chat_id, "refused", NOT_COUNTED, "req-2")
    assert created
    assert again.id != message.id


async def test_completion_leases(store: SqlConversationStore, new_user: Callable[[], str]) -> None:
    user = new_user()
    chat_id = await new_chat(store, user)
    turn = await store.start_turn(user, chat_id, "Hi", "req-lease", lease=Lease("replica-a", 60))
    message = turn.message.id
    assert not await store.claim_completion(user, message, Lease("replica-b", 60)), "a runs it"
    assert await store.claim_completion(user, message, Lease("replica-a", 60)), "a renews its own"
    await store.release_completion(message, "replica-b")  # not b's to release
    assert not await store.claim_completion(user, message, Lease("replica-b", 60))
    await store.release_completion(message, "replica-a")
    assert await store.claim_completion(user, message, Lease("replica-b", 0)), "free after a released it"
    # b's lease of 0 s has lapsed at once: anyone may take over.
    assert await store.claim_completion(user, message, Lease("replica-c", 60))
    with pytest.raises(NotFound):
        await store.claim_completion(new_user(), message, Lease("replica-d", 60))


async def test_the_coarse_calls_of_a_retry_a_failed_turn_and_a_stored_question(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    """`claim_reply`, `end_turn_unanswered` and `stored_turn` do in one call what the finer calls did."""
    user, other = new_user(), new_user()
    chat_id = await new_chat(store, user)
    earlier = await add_turns(store, user, chat_id, 1)
    turn = await store.start_turn(user, chat_id, "Hi", "req-coarse", lease=Lease("replica-a", 60))
    message = turn.message.id
    assert await store.claim_reply(user, message, Lease("replica-b", 60)) == ReplyClaim(None, False)
    assert await store.claim_reply(user, message, Lease("replica-a", 60)) == ReplyClaim(None, True)
    with pytest.raises(NotFound):
        await store.claim_reply(other, message, Lease("replica-a", 60))

    # A failed turn: its count is recorded and a's lease is given up; b's would be left alone.
    await store.end_turn_unanswered(user, message, "replica-b", None)
    assert not await store.claim_completion(user, message, Lease("replica-b", 60)), "still a's"
    await store.end_turn_unanswered(user, message, "replica-a", 9)
    assert (await store.history(user, chat_id))[-1].token_count == 9
    await store.end_turn_unanswered(other, message, "replica-a", 11)  # not the other user's to touch
    assert (await store.history(user, chat_id))[-1].token_count == 9
    assert await store.claim_reply(user, message, Lease("replica-b", 60)) == ReplyClaim(None, True)

    stored = await store.stored_turn(user, message)
    assert stored.chat == await store.get_chat(user, chat_id)
    assert stored.message == (await store.history(user, chat_id))[-1]
    assert [m.id for m in stored.history] == [*(m.id for m in earlier), message]
    with pytest.raises(NotFound):
        await store.stored_turn(other, message)

    reply, _ = await store.add_assistant_message(user, chat_id, message, "Hello", 1, FinishReason.STOP)
    assert await store.claim_reply(user, message, Lease("replica-c", 60)) == ReplyClaim(reply, False)
    assert [m.id for m in (await store.stored_turn(user, message)).history][-1] == message
