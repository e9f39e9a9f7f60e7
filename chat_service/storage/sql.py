"""The SQLAlchemy conversation store: PostgreSQL through asyncpg, or SQLite through aiosqlite.

Every method runs one short transaction. Idempotency rests on the unique constraints of the schema, not on
check-then-insert: an insert that collides with a stored copy fails with `IntegrityError`, is rolled back,
and the stored row is read and returned instead. That holds however many retries race each other.

Writes to a chat's messages first update the chat row (activity time, title). Besides doing the work, that
takes the chat's row lock on PostgreSQL (SQLite locks the whole database anyway), so a chat's messages are
committed in `seq` order and a reader paging by `seq` can never skip a message committed late.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
from sqlalchemy import (
    Select,
    Table,
    Update,
    case,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy import update as sql_update
from sqlalchemy.engine import URL, Dialect, Row, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection, ExceptionContext
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import aliased
from sqlalchemy.pool import ConnectionPoolEntry

from chat_service.domain import (
    Chat,
    ChatCursor,
    ChatUpdate,
    FinishReason,
    HistoryStrategy,
    Job,
    JobRequest,
    JobState,
    Message,
    Role,
)
from chat_service.storage.base import (
    NOT_COUNTED,
    ConversationStore,
    JobStore,
    Lease,
    LimitReached,
    TurnStart,
)
from chat_service.storage.migrate import upgrade_to_head
from chat_service.storage.models import ChatRow, GenerationSlotRow, JobRow, MessageRow
from chatmesh.common.errors import NotFound, Unavailable

TITLE_MAX_CHARS = 80
_ELLIPSIS = "…"
# A racing delete can remove the row we collided with before we read it back, and inserting again is then
# right; a collision that persists across attempts is a bug, not a race.
_IDEMPOTENT_ATTEMPTS = 3
# First keys of the PostgreSQL advisory locks that serialize one user's limit checks (the second key is a
# hash of the user id): one namespace per limit, so a user's completions and jobs do not wait on each other.
_SLOTS_LOCK = 0x434D0001
_JOBS_LOCK = 0x434D0002
_UNFINISHED_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


def title_from_content(content: str) -> str:
    """A chat title from its first message: the first non-blank line, whitespace collapsed, at most
    `TITLE_MAX_CHARS` characters, cut at a word boundary (ending in "…") when it is longer."""
    line = next((line for line in content.splitlines() if line.strip()), "")
    line = " ".join(line.split())
    if len(line) <= TITLE_MAX_CHARS:
        return line
    head = line[: TITLE_MAX_CHARS - len(_ELLIPSIS) + 1]
    # One character beyond the budget tells whether the budget ends exactly between two words.
    cut = head.rfind(" ")
    # A single huge word (or one that would leave a stub of a title) is cut hard instead.
    head = head[:cut] if cut >= TITLE_MAX_CHARS // 2 else head[:-1]
    return head.rstrip(" ,;:.-") + _ELLIPSIS


def _now() -> datetime:
    return datetime.now(UTC)


def _chat_not_found(chat_id: uuid.UUID) -> NotFound:
    return NotFound(f"chat {chat_id} not found")


def _message_not_found(message_id: uuid.UUID) -> NotFound:
    return NotFound(f"message {message_id} not found")


def _to_chat(row: ChatRow) -> Chat:
    return Chat(
        id=row.id,
        user_id=row.user_id,
        title=row.title,
        system_prompt=row.system_prompt,
        history_strategy=HistoryStrategy(row.history_strategy),
        created_at=row.created_at,
        last_activity_at=row.last_activity_at,
    )


def _to_message(row: MessageRow) -> Message:
    return Message(
        id=row.id,
        chat_id=row.chat_id,
        user_id=row.user_id,
        seq=row.seq,
        role=Role(row.role),
        content=row.content,
        token_count=row.token_count,
        finish_reason=FinishReason(row.finish_reason) if row.finish_reason is not None else None,
        request_id=row.request_id,
        reply_to=row.reply_to,
        created_at=row.created_at,
        summary=row.summary,
        prompt_tokens=row.prompt_tokens,
    )


def _own_chat(user_id: str, chat_id: uuid.UUID) -> Select[uuid.UUID]:
    return select(ChatRow.id).where(ChatRow.id == chat_id, ChatRow.user_id == user_id)


def _chat_messages(user_id: str, chat_id: uuid.UUID, after_seq: int | None) -> Select[MessageRow]:
    """The chat's messages in seq order, only if the chat is the user's.

    Ownership is an uncorrelated EXISTS on the chat's primary key, which PostgreSQL runs once before the
    scan. Filtering on the messages' own user_id column instead would be equivalent, but the planner takes
    it for an independent condition, underestimates the rows of a long chat and switches to a bitmap scan
    plus sort of everything after the cursor.
    """
    query = select(MessageRow).where(MessageRow.chat_id == chat_id, _own_chat(user_id, chat_id).exists())
    if after_seq is not None:
        query = query.where(MessageRow.seq > after_seq)
    return query.order_by(MessageRow.seq)


async def _read_history(connection: AsyncConnection, chat_id: uuid.UUID) -> list[Message]:
    """The chat's messages in seq order, ownership unchecked: for callers whose statement checks it."""
    rows = await connection.execute(
        select(MessageRow).where(MessageRow.chat_id == chat_id).order_by(MessageRow.seq)
    )
    return [_to_message(row) for row in rows]  # type: ignore[arg-type]


def _bump_chat(user_id: str, chat_id: uuid.UUID, now: datetime, title: str | None) -> Update:
    """UPDATE the user's chat: activity time now, an empty title filled with `title`; RETURNING the row
    (none: not the user's chat). Taking the chat's row lock first is what orders its messages' writes."""
    chats = cast(Table, ChatRow.__table__)
    values: dict[str, Any] = {"last_activity_at": now}
    if title:
        values["title"] = case((chats.c.title == "", title), else_=chats.c.title)
    return (
        sql_update(chats)
        .where(chats.c.id == chat_id, chats.c.user_id == user_id)
        .values(**values)
        .returning(*chats.c)
    )


def _to_job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        request=JobRequest(
            user_id=row.user_id,
            chat_id=row.chat_id,
            user_message_id=row.user_message_id,
            max_tokens=row.max_tokens,
            temperature=row.temperature,
            top_p=row.top_p,
            seed=row.seed,
            use_cache=row.use_cache,
        ),
        state=JobState(row.state),
        attempts=row.attempts,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _job_not_found(job_id: uuid.UUID) -> NotFound:
    return NotFound(f"job {job_id} not found")


class SqlConversationStore(ConversationStore, JobStore):
    """`ConversationStore` and `JobStore` over an async SQLAlchemy engine whose schema is at the newest
    migration.

    Subclasses the Protocol explicitly so that mypy checks every signature against it.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        # Single-statement reads need no transaction of their own: autocommit skips BEGIN/ROLLBACK, and
        # Core rows skip the ORM's identity map. These serve every list and history call.
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")

    @property
    def engine(self) -> AsyncEngine:
        """The engine the store runs on (for health checks and diagnostics)."""
        return self._engine

    async def ping(self) -> None:
        """One round trip to the database (`SELECT 1`); raises if it does not answer."""
        async with self._reader.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def create_chat(
        self,
        user_id: str,
        title: str,
        system_prompt: str,
        history_strategy: HistoryStrategy,
        request_id: str | None = None,
    ) -> tuple[Chat, bool]:
        """Create and commit a chat; a retry with the same (user, request_id) returns the first chat and
        False."""
        for _ in range(_IDEMPOTENT_ATTEMPTS):
            now = _now()
            row = ChatRow(
                id=uuid.uuid4(),
                user_id=user_id,
                title=title,
                system_prompt=system_prompt,
                history_strategy=history_strategy.value,
                request_id=request_id,
                created_at=now,
                last_activity_at=now,
            )
            try:
                async with self._sessions.begin() as session:
                    session.add(row)
                return _to_chat(row), True
            except IntegrityError:
                if request_id is None:
                    raise
            async with self._sessions.begin() as session:
                existing = await session.scalar(
                    select(ChatRow).where(ChatRow.user_id == user_id, ChatRow.request_id == request_id)
                )
            if existing is not None:
                return _to_chat(existing), False
        raise RuntimeError(f"create_chat kept colliding on request id {request_id!r}")

    async def get_chat(self, user_id: str, chat_id: uuid.UUID) -> Chat:
        """The user's chat, or `NotFound`."""
        async with self._reader.connect() as connection:
            row = (
                await connection.execute(
                    select(ChatRow).where(ChatRow.id == chat_id, ChatRow.user_id == user_id)
                )
            ).first()
        if row is None:
            raise _chat_not_found(chat_id)
        return _to_chat(row)  # type: ignore[arg-type]

    async def list_chats(self, user_id: str, limit: int, after: ChatCursor | None) -> Sequence[Chat]:
        """Up to `limit` of the user's chats, most recent activity first, strictly after `after`.

        Keyset pagination on (last_activity_at desc, id desc): a backward scan of `ix_chats_user_activity`
        that starts at the cursor, so late pages cost the same as the first.
        """
        if limit < 1:
            return []
        query = select(ChatRow).where(ChatRow.user_id == user_id)
        if after is not None:
            query = query.where(
                tuple_(ChatRow.last_activity_at, ChatRow.id) < (after.last_activity_at, after.chat_id)
            )
        query = query.order_by(ChatRow.last_activity_at.desc(), ChatRow.id.desc()).limit(limit)
        async with self._reader.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [_to_chat(row) for row in rows]  # type: ignore[arg-type]

    async def update_chat(self, user_id: str, chat_id: uuid.UUID, update: ChatUpdate) -> Chat:
        """Apply the non-None fields of the update and commit; `NotFound` for a missing or foreign chat."""
        values: dict[str, Any] = {}
        if update.title is not None:
            values["title"] = update.title
        if update.system_prompt is not None:
            values["system_prompt"] = update.system_prompt
        if update.history_strategy is not None:
            values["history_strategy"] = update.history_strategy.value
        if not values:
            return await self.get_chat(user_id, chat_id)
        async with self._sessions.begin() as session:
            row = await session.scalar(
                sql_update(ChatRow)
                .where(ChatRow.id == chat_id, ChatRow.user_id == user_id)
                .values(**values)
                .returning(ChatRow)
                .execution_options(synchronize_session=False)
            )
        if row is None:
            raise _chat_not_found(chat_id)
        return _to_chat(row)

    async def delete_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        """Delete the chat and its messages in one transaction; `NotFound` for a missing or foreign chat."""
        async with self._sessions.begin() as session:
            # Lock the chat first: a message being added concurrently waits for us, then finds no chat.
            if await session.scalar(_own_chat(user_id, chat_id).with_for_update()) is None:
                raise _chat_not_found(chat_id)
            # Explicit rather than relying on ON DELETE CASCADE, which SQLite ignores on a connection
            # that did not enable foreign keys.
            await session.execute(
                delete(MessageRow)
                .where(MessageRow.chat_id == chat_id)
                .execution_options(synchronize_session=False)
            )
            await session.execute(
                delete(ChatRow).where(ChatRow.id == chat_id).execution_options(synchronize_session=False)
            )

    async def _touch_chat(
        self,
        executor: AsyncConnection | AsyncSession,
        user_id: str,
        chat_id: uuid.UUID,
        now: datetime,
        title: str | None,
    ) -> Row[Any]:
        """Bump the chat's activity time (and fill an empty title) and return its row, or raise `NotFound`.
        A Core statement, so it serves both the ORM transactions and `start_turn`'s plain connection."""
        bumped = (await executor.execute(_bump_chat(user_id, chat_id, now, title))).first()
        if bumped is None:
            raise _chat_not_found(chat_id)
        return bumped

    async def add_user_message(
        self, user_id: str, chat_id: uuid.UUID, content: str, token_count: int, request_id: str | None
    ) -> tuple[Message, bool]:
        """Commit a user message, bump the chat's activity and set its title if empty, in one transaction.
        A retry with the same (chat, request_id) returns the stored message and False."""
        turn = await self._insert_user_message(
            user_id, chat_id, content, token_count, request_id, with_history=False
        )
        return turn.message, turn.created

    async def start_turn(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        content: str,
        request_id: str | None,
        *,
        with_history: bool = True,
        lease: Lease | None = None,
    ) -> TurnStart:
        """Everything a completion needs before generating, in one transaction: bump the chat (owner check,
        activity, title), read its history, insert the user message (not counted yet: `NOT_COUNTED`;
        claimed by `lease`). Idempotent like `add_user_message`."""
        return await self._insert_user_message(
            user_id, chat_id, content, NOT_COUNTED, request_id, with_history=with_history, lease=lease
        )

    async def _insert_user_message(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        content: str,
        token_count: int,
        request_id: str | None,
        *,
        with_history: bool,
        lease: Lease | None = None,
    ) -> TurnStart:
        for _ in range(_IDEMPOTENT_ATTEMPTS):
            now = _now()
            message_id = uuid.uuid4()
            title = title_from_content(content)
            values = {
                "id": message_id,
                "chat_id": chat_id,
                "user_id": user_id,
                "role": Role.USER.value,
                "content": content,
                "token_count": token_count,
                "request_id": request_id,
                "created_at": now,
                "running_on": lease.holder if lease else None,
                "lease_until": now + timedelta(seconds=lease.seconds) if lease else None,
            }
            try:
                if self._engine.dialect.name == "postgresql":
                    chat_row, seq, earlier = await self._insert_turn_one_statement(
                        user_id, chat_id, now, title, values, with_history
                    )
                else:
                    chat_row, seq, earlier = await self._insert_turn_transaction(
                        user_id, chat_id, now, title, values, with_history
                    )
                message = Message(
                    id=message_id,
                    chat_id=chat_id,
                    user_id=user_id,
                    seq=seq,
                    role=Role.USER,
                    content=content,
                    token_count=token_count,
                    finish_reason=None,
                    request_id=request_id,
                    reply_to=None,
                    created_at=now,
                )
                return TurnStart(_to_chat(chat_row), message, True, [*earlier, message])  # type: ignore[arg-type]
            except IntegrityError:
                if request_id is None:
                    raise
            async with self._sessions.begin() as session:
                existing = await session.scalar(
                    select(MessageRow).where(
                        MessageRow.chat_id == chat_id,
                        MessageRow.request_id == request_id,
                        MessageRow.user_id == user_id,
                    )
                )
                chat_row = await session.scalar(
                    select(ChatRow).where(ChatRow.id == chat_id, ChatRow.user_id == user_id)
                )
            if existing is not None and chat_row is not None:
                return TurnStart(_to_chat(chat_row), _to_message(existing), False, [])
        raise RuntimeError(f"add_user_message kept colliding on request id {request_id!r}")

    async def _insert_turn_transaction(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        now: datetime,
        title: str,
        values: dict[str, Any],
        with_history: bool,
    ) -> tuple[Row[Any], int, list[Message]]:
        """Bump the chat, read its history, insert the user message: one transaction of three statements.
        Nothing in here waits on anything but the database: on SQLite this transaction holds the write
        lock of every replica."""
        messages = cast(Table, MessageRow.__table__)
        # Core statements on a plain connection: this is on the path to the first token, and the ORM's
        # unit of work costs more than the statements themselves.
        async with self._engine.begin() as connection:
            chat_row = await self._touch_chat(connection, user_id, chat_id, now, title)
            earlier = []
            if with_history:
                earlier = await _read_history(connection, chat_id)
            seq = (
                await connection.execute(insert(messages).values(**values).returning(messages.c.seq))
            ).scalar_one()
        return chat_row, seq, earlier

    async def _insert_turn_one_statement(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        now: datetime,
        title: str,
        values: dict[str, Any],
        with_history: bool,
    ) -> tuple[Row[Any], int, list[Message]]:
        """PostgreSQL: bump the chat and insert the user message in ONE statement (data-modifying CTEs, in
        autocommit: the statement is its own transaction, so no BEGIN or COMMIT round trips), while the
        history is read beside it on another connection. This is on the path to the first token.

        The UPDATE takes the chat's row lock before the INSERT, as every other write does, so messages are
        still committed in `seq` order. The history read may see the new message, or one of a concurrent
        turn of the same chat committed after it; `seq` leaves both out."""
        messages = cast(Table, MessageRow.__table__)
        touched = _bump_chat(user_id, chat_id, now, title).cte("touched")
        columns = [name for name in values if name != "chat_id"]
        inserted = (
            insert(messages)
            .from_select(
                ["chat_id", *columns],
                select(touched.c.id, *(literal(values[name], messages.c[name].type) for name in columns)),
            )
            .returning(messages.c.seq, messages.c.chat_id)
            .cte("inserted")
        )
        reading = asyncio.ensure_future(self._history_rows(chat_id)) if with_history else None
        try:
            async with self._reader.connect() as connection:
                row = (
                    await connection.execute(
                        select(touched, inserted.c.seq).join_from(
                            touched, inserted, touched.c.id == inserted.c.chat_id
                        )
                    )
                ).first()
            if row is None:
                raise _chat_not_found(chat_id)
            seq: int = row.seq
            earlier = [m for m in await reading if m.seq < seq] if reading is not None else []
        finally:
            if reading is not None and not reading.done():
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        return row, seq, earlier

    async def _history_rows(self, chat_id: uuid.UUID) -> list[Message]:
        """The chat's messages in seq order on a connection of its own, ownership unchecked (the caller
        checks it)."""
        async with self._reader.connect() as connection:
            return await _read_history(connection, chat_id)

    async def add_assistant_message(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        reply_to: uuid.UUID,
        content: str,
        token_count: int,
        finish_reason: FinishReason,
        prompt_tokens: int | None = None,
        question_tokens: int | None = None,
    ) -> tuple[Message, bool]:
        """Commit the reply to the user message `reply_to` of this chat (`NotFound` if there is no such
        message), recording `question_tokens` as that message's token count if given; a second reply to
        the same message returns the stored one and False."""
        for _ in range(_IDEMPOTENT_ATTEMPTS):
            now = _now()
            row = MessageRow(
                id=uuid.uuid4(),
                chat_id=chat_id,
                user_id=user_id,
                role=Role.ASSISTANT.value,
                content=content,
                token_count=token_count,
                finish_reason=finish_reason.value,
                request_id=None,
                reply_to=reply_to,
                summary=None,
                created_at=now,
                prompt_tokens=prompt_tokens,
            )
            try:
                async with self._sessions.begin() as session:
                    await self._touch_chat(session, user_id, chat_id, now, None)
                    is_question = (
                        MessageRow.id == reply_to,
                        MessageRow.chat_id == chat_id,
                        MessageRow.role == Role.USER.value,
                    )
                    if question_tokens is None:
                        question = await session.scalar(select(MessageRow.seq).where(*is_question))
                    else:
                        # The same statement checks the question and records its count, which was not
                        # known yet when it was stored.
                        question = await session.scalar(
                            sql_update(MessageRow)
                            .where(*is_question)
                            .values(token_count=question_tokens)
                            .returning(MessageRow.seq)
                            .execution_options(synchronize_session=False)
                        )
                    if question is None:
                        raise _message_not_found(reply_to)
                    session.add(row)
                return _to_message(row), True
            except IntegrityError:
                pass
            reply = await self.find_reply(user_id, reply_to)
            if reply is not None:
                return reply, False
        raise RuntimeError(f"add_assistant_message kept colliding on the reply to {reply_to}")

    async def record_token_count(self, user_id: str, message_id: uuid.UUID, token_count: int) -> None:
        """Record the token count of the user's message `message_id`; `NotFound` if there is none."""
        await self._update_message(user_id, message_id, token_count=token_count)

    async def find_reply(self, user_id: str, user_message_id: uuid.UUID) -> Message | None:
        """The user's stored reply to `user_message_id`, if any."""
        async with self._sessions.begin() as session:
            row = await session.scalar(
                select(MessageRow).where(
                    MessageRow.reply_to == user_message_id, MessageRow.user_id == user_id
                )
            )
        return _to_message(row) if row is not None else None

    async def claim_completion(self, user_id: str, message_id: uuid.UUID, lease: Lease) -> bool:
        now = _now()
        async with self._sessions.begin() as session:
            claimed = await session.scalar(
                sql_update(MessageRow)
                .where(
                    MessageRow.id == message_id,
                    MessageRow.user_id == user_id,
                    MessageRow.role == Role.USER.value,
                    or_(
                        MessageRow.running_on.is_(None),
                        MessageRow.running_on == lease.holder,
                        MessageRow.lease_until < now,
                    ),
                )
                .values(running_on=lease.holder, lease_until=now + timedelta(seconds=lease.seconds))
                .returning(MessageRow.seq)
                .execution_options(synchronize_session=False)
            )
            if claimed is not None:
                return True
            exists = await session.scalar(
                select(MessageRow.seq).where(MessageRow.id == message_id, MessageRow.user_id == user_id)
            )
        if exists is None:
            raise _message_not_found(message_id)
        return False

    async def release_completion(self, message_id: uuid.UUID, holder: str) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                sql_update(MessageRow)
                .where(MessageRow.id == message_id, MessageRow.running_on == holder)
                .values(running_on=None, lease_until=None)
                .execution_options(synchronize_session=False)
            )

    async def _lock_user(self, connection: AsyncConnection | AsyncSession, key: int, user_id: str) -> None:
        """Serialize the user's count-then-take steps until the transaction ends. PostgreSQL: a transaction
        advisory lock on (key, hash of the user), since under READ COMMITTED two transactions would each
        count without the other's uncommitted row. SQLite needs none: the caller writes before it counts,
        and the first write takes the database's single write lock until commit."""
        if self._engine.dialect.name == "postgresql":
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key, hashtext(:user_id))"),
                {"key": key, "user_id": user_id},
            )

    async def take_generation_slot(self, user_id: str, slot_id: uuid.UUID, lease: Lease, limit: int) -> bool:
        slots = cast(Table, GenerationSlotRow.__table__)
        now = _now()
        async with self._engine.begin() as connection:
            await self._lock_user(connection, _SLOTS_LOCK, user_id)
            # Slots of replicas that died: their lease lapsed, they count no more; the user's own clean-up.
            await connection.execute(
                delete(slots).where(slots.c.user_id == user_id, slots.c.lease_until < now)
            )
            held = await connection.scalar(
                select(slots.c.id).where(slots.c.id == slot_id, slots.c.user_id == user_id)
            )
            if held is not None:
                return False
            await connection.execute(
                insert(slots).values(
                    id=slot_id,
                    user_id=user_id,
                    holder=lease.holder,
                    acquired_at=now,
                    lease_until=now + timedelta(seconds=lease.seconds),
                )
            )
            others, oldest = (
                await connection.execute(
                    select(func.count(), func.min(slots.c.acquired_at)).where(
                        slots.c.user_id == user_id, slots.c.id != slot_id
                    )
                )
            ).one()
            if others >= limit:
                # Raised inside the transaction: the slot just inserted is rolled back.
                raise LimitReached(others, oldest)
        return True

    async def renew_generation_slot(self, slot_id: uuid.UUID, lease: Lease) -> None:
        slots = cast(Table, GenerationSlotRow.__table__)
        async with self._engine.begin() as connection:
            await connection.execute(
                sql_update(slots)
                .where(slots.c.id == slot_id)
                .values(lease_until=_now() + timedelta(seconds=lease.seconds))
            )

    async def release_generation_slot(self, slot_id: uuid.UUID) -> None:
        slots = cast(Table, GenerationSlotRow.__table__)
        async with self._engine.begin() as connection:
            await connection.execute(delete(slots).where(slots.c.id == slot_id))

    async def chat_of_message(self, user_id: str, message_id: uuid.UUID) -> uuid.UUID:
        async with self._reader.connect() as connection:
            chat_id = await connection.scalar(
                select(MessageRow.chat_id).where(MessageRow.id == message_id, MessageRow.user_id == user_id)
            )
        if chat_id is None:
            raise _message_not_found(message_id)
        return chat_id  # type: ignore[no-any-return]

    async def _require_chat(self, session: AsyncSession, user_id: str, chat_id: uuid.UUID) -> None:
        if await session.scalar(_own_chat(user_id, chat_id)) is None:
            raise _chat_not_found(chat_id)

    async def history(
        self, user_id: str, chat_id: uuid.UUID, after_seq: int | None = None
    ) -> Sequence[Message]:
        """Every message of the chat (after `after_seq` if given) oldest first; `NotFound` as for get_chat."""
        return await self._read_messages(user_id, chat_id, _chat_messages(user_id, chat_id, after_seq))

    async def messages_page(
        self, user_id: str, chat_id: uuid.UUID, limit: int, after_seq: int | None
    ) -> Sequence[Message]:
        """Up to `limit` messages oldest first, strictly after `after_seq`; `NotFound` as for get_chat."""
        return await self._read_messages(
            user_id, chat_id, _chat_messages(user_id, chat_id, after_seq).limit(max(limit, 0))
        )

    async def _read_messages(
        self, user_id: str, chat_id: uuid.UUID, query: Select[MessageRow]
    ) -> Sequence[Message]:
        async with self._reader.connect() as connection:
            rows = (await connection.execute(query)).all()
            # An empty result is either an empty chat or nobody's (or someone else's) chat.
            if not rows and (await connection.execute(_own_chat(user_id, chat_id))).first() is None:
                raise _chat_not_found(chat_id)
        return [_to_message(row) for row in rows]  # type: ignore[arg-type]

    async def latest_summary(self, user_id: str, chat_id: uuid.UUID) -> Message | None:
        """The newest message of the chat carrying a summary; `NotFound` as for get_chat."""
        async with self._sessions.begin() as session:
            row = await session.scalar(
                _chat_messages(user_id, chat_id, None)
                .where(MessageRow.summary.is_not(None))
                .order_by(None)
                .order_by(MessageRow.seq.desc())
                .limit(1)
            )
            if row is None:
                await self._require_chat(session, user_id, chat_id)
        return _to_message(row) if row is not None else None

    async def save_summary(self, user_id: str, message_id: uuid.UUID, summary: str) -> None:
        """Store `summary` on the user's message `message_id`; `NotFound` if there is no such message."""
        await self._update_message(user_id, message_id, summary=summary)

    async def _update_message(self, user_id: str, message_id: uuid.UUID, **values: Any) -> None:
        """Set `values` on the user's message `message_id`; `NotFound` if the user has no such message."""
        async with self._sessions.begin() as session:
            updated = await session.scalar(
                sql_update(MessageRow)
                .where(MessageRow.id == message_id, MessageRow.user_id == user_id)
                .values(**values)
                .returning(MessageRow.seq)
                .execution_options(synchronize_session=False)
            )
        if updated is None:
            raise _message_not_found(message_id)

    # -- jobs ------------------------------------------------------------------------------------------

    async def create_job(self, request: JobRequest, max_active: int = 0) -> tuple[Job, bool]:
        """Commit a queued job for the user's message `request.user_message_id` (one job per message);
        with `max_active`, only while the user has fewer unfinished jobs (`LimitReached`)."""
        for _ in range(_IDEMPOTENT_ATTEMPTS):
            now = _now()
            row = JobRow(
                id=uuid.uuid4(),
                user_id=request.user_id,
                chat_id=request.chat_id,
                user_message_id=request.user_message_id,
                state=JobState.QUEUED.value,
                attempts=0,
                error=None,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                use_cache=request.use_cache,
                created_at=now,
                updated_at=now,
            )
            try:
                async with self._sessions.begin() as session:
                    message = await session.scalar(
                        select(MessageRow.id).where(
                            MessageRow.id == request.user_message_id,
                            MessageRow.chat_id == request.chat_id,
                            MessageRow.user_id == request.user_id,
                            MessageRow.role == Role.USER.value,
                        )
                    )
                    if message is None:
                        raise _message_not_found(request.user_message_id)
                    if max_active:
                        await self._lock_user(session, _JOBS_LOCK, request.user_id)
                    session.add(row)
                    if max_active:
                        # Inserted before counting: a retry collides here and gets its job back, never
                        # refused; on SQLite the insert takes the write lock the count needs.
                        await session.flush()
                        await self._check_active_jobs(session, request.user_id, row.id, max_active)
                return _to_job(row), True
            except IntegrityError:
                pass
            async with self._sessions.begin() as session:
                existing = await session.scalar(
                    select(JobRow).where(
                        JobRow.user_message_id == request.user_message_id,
                        JobRow.user_id == request.user_id,
                    )
                )
            if existing is not None:
                return _to_job(existing), False
        raise RuntimeError(f"create_job kept colliding on message {request.user_message_id}")

    async def get_job(self, user_id: str, job_id: uuid.UUID) -> Job:
        async with self._sessions.begin() as session:
            row = await session.scalar(select(JobRow).where(JobRow.id == job_id, JobRow.user_id == user_id))
        if row is None:
            raise _job_not_found(job_id)
        return _to_job(row)

    async def load_job(self, job_id: uuid.UUID) -> Job | None:
        async with self._sessions.begin() as session:
            row = await session.scalar(select(JobRow).where(JobRow.id == job_id))
        return _to_job(row) if row is not None else None

    async def update_job(
        self, job_id: uuid.UUID, state: JobState, attempts: int, error: str | None = None
    ) -> None:
        now = _now()
        async with self._sessions.begin() as session:
            await session.execute(
                sql_update(JobRow)
                .where(JobRow.id == job_id)
                .values(
                    state=state.value,
                    attempts=attempts,
                    error=error,
                    updated_at=now,
                    # A job a worker reports on was delivered, so queued: never one for the sweeper.
                    published_at=case((JobRow.published_at.is_(None), now), else_=JobRow.published_at),
                )
                .execution_options(synchronize_session=False)
            )

    async def mark_job_published(self, job_id: uuid.UUID) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                sql_update(JobRow)
                .where(JobRow.id == job_id, JobRow.published_at.is_(None))
                .values(published_at=_now())
                .execution_options(synchronize_session=False)
            )

    async def unpublished_jobs(self, created_before: datetime, limit: int) -> Sequence[Job]:
        async with self._sessions.begin() as session:
            rows = await session.scalars(
                select(JobRow)
                .where(
                    JobRow.published_at.is_(None),
                    JobRow.created_at < created_before,
                    JobRow.state == JobState.QUEUED.value,
                    JobRow.attempts == 0,
                )
                .order_by(JobRow.created_at)
                .limit(limit)
            )
            return [_to_job(row) for row in rows]

    @staticmethod
    async def _check_active_jobs(
        session: AsyncSession, user_id: str, job_id: uuid.UUID, max_active: int
    ) -> None:
        """`LimitReached` if the user has `max_active` unfinished jobs besides `job_id`."""
        others, oldest = (
            await session.execute(
                select(func.count(), func.min(JobRow.created_at)).where(
                    JobRow.user_id == user_id,
                    JobRow.state.in_(_UNFINISHED_JOB_STATES),
                    JobRow.id != job_id,
                )
            )
        ).one()
        if others >= max_active:
            raise LimitReached(others, oldest)

    async def discard_question(self, user_id: str, message_id: uuid.UUID) -> None:
        replies = aliased(MessageRow)  # not the row being deleted: a subquery would correlate to it
        async with self._sessions.begin() as session:
            await session.execute(
                delete(MessageRow).where(
                    MessageRow.id == message_id,
                    MessageRow.user_id == user_id,
                    MessageRow.role == Role.USER.value,
                    ~select(replies.id).where(replies.reply_to == message_id).exists(),
                    ~select(JobRow.id).where(JobRow.user_message_id == message_id).exists(),
                )
            )

    async def discard_job(self, job: Job) -> None:
        async with self._sessions.begin() as session:
            await session.execute(delete(JobRow).where(JobRow.id == job.id))
            answered = await session.scalar(
                select(MessageRow.id).where(MessageRow.reply_to == job.request.user_message_id)
            )
            if answered is None:
                await session.execute(
                    delete(MessageRow).where(
                        MessageRow.id == job.request.user_message_id,
                        MessageRow.user_id == job.request.user_id,
                    )
                )


def _async_url(database_url: str) -> URL:
    """Parse the URL, choosing the async driver when a plain `sqlite://` or `postgresql://` is given."""
    url = make_url(database_url)
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        url = url.set(drivername="sqlite+aiosqlite")
    elif url.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        url = url.set(drivername="postgresql+asyncpg")
    return url


def _sqlite_on_connect(dbapi_connection: DBAPIConnection, connection_record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite ships with foreign keys off, per connection.
    cursor.execute("PRAGMA foreign_keys = ON")
    # Readers do not block the writer nor the writer the readers; persistent, but cheap to re-assert.
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


_UNREACHABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)
"""What PostgreSQL (or the way to it) raises while it is down, starting or shutting down."""


def _unreachable(cause: BaseException) -> Unavailable:
    return Unavailable(f"the database cannot be reached ({type(cause).__name__}); retry")


def _unavailable_when_unreachable(context: ExceptionContext) -> None:
    """A database that cannot be reached (down, restarting, a dropped connection) is a dependency that
    is unavailable, not a bug: the call fails with UNAVAILABLE and a message that says so, and a retry
    may succeed. Every other database error stays what it is."""
    original = context.original_exception
    if not isinstance(original, Exception):
        return  # a cancelled call (its connection is dropped as a disconnect) stays cancelled
    if context.is_disconnect or isinstance(original, _UNREACHABLE):
        raise _unreachable(original) from (context.sqlalchemy_exception or original)


def _connect_or_unavailable(
    dialect: Dialect, record: ConnectionPoolEntry, cargs: Sequence[Any], cparams: dict[str, Any]
) -> DBAPIConnection:
    """A new connection, or Unavailable: errors of connecting bypass `handle_error`."""
    try:
        return dialect.connect(*cargs, **cparams)
    except _UNREACHABLE as exc:
        raise _unreachable(exc) from exc


def create_store_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine for the conversation store (see `open_sql_store`)."""
    url = _async_url(database_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            # Seconds a writer waits for another connection's write lock before "database is locked".
            connect_args={"timeout": 30},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    if url.get_backend_name() == "postgresql":
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            # No pre-ping: it costs a round trip on every checkout (~0.2 ms of a 0.5 ms read). A connection
            # the server closed fails one request, after which SQLAlchemy invalidates the pool's older
            # connections; recycling keeps idle ones from going stale in between.
            pool_recycle=1800,
            connect_args={"server_settings": {"application_name": "chatmesh-chat"}},
        )
        event.listen(engine.sync_engine, "handle_error", _unavailable_when_unreachable)
        event.listen(engine.sync_engine, "do_connect", _connect_or_unavailable)
        return engine
    raise ValueError(f"unsupported chat database {url.render_as_string(hide_password=True)!r}")


@asynccontextmanager
async def open_sql_store(
    database_url: str, *, migrate: bool = True, pool_size: int = 10
) -> AsyncIterator[SqlConversationStore]:
    """Open the SQL conversation store at `database_url` for the duration of the context.

    `postgresql+asyncpg://...` or `sqlite+aiosqlite:///path/to/chat.db` (plain `postgresql://` and
    `sqlite://` select those drivers). For SQLite the file's directory is created, foreign keys are
    enforced and the journal is in WAL mode. With `migrate`, the schema is brought to the newest Alembic
    revision first. The engine is disposed on exit.
    """
    engine = create_store_engine(database_url, pool_size=pool_size)
    try:
        if migrate:
            await upgrade_to_head(engine)
        yield SqlConversationStore(engine)
    finally:
        await engine.dispose()
