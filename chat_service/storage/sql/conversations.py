"""The SQLAlchemy conversation store: chats and their messages, the completion leases on the messages,
and (from `SqlGenerationSlots`) the per-user completion slots.

Every method runs one short transaction. Idempotency rests on the unique constraints of the schema, not on
check-then-insert: an insert that collides with a stored copy fails with `IntegrityError`, is rolled back,
and the stored row is read and returned instead. That holds however many retries race each other.

Writes to a chat's messages first update the chat row (activity time, title). Besides doing the work, that
takes the chat's row lock on PostgreSQL (SQLite locks the whole database anyway), so a chat's messages are
committed in `seq` order and a reader paging by `seq` can never skip a message committed late.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, case, delete, or_, select, tuple_
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from chat_service.accounting.values import UsageEntry
from chat_service.domain import Chat, ChatCursor, ChatUpdate, FinishReason, HistoryStrategy, Message, Role
from chat_service.storage.base import (
    NOT_COUNTED,
    ConversationStore,
    Lease,
    ReplyClaim,
    StoredTurn,
    TurnStart,
)
from chat_service.storage.models import ChatRow, MessageRow
from chat_service.storage.sql.accounts import insert_usage
from chat_service.storage.sql.database import SqlDatabase
from chat_service.storage.sql.rows import (
    IDEMPOTENT_ATTEMPTS,
    chat_messages,
    chat_not_found,
    message_not_found,
    own_chat,
    read_history,
    to_chat,
    to_message,
    touch_chat,
    utc_now,
)
from chat_service.storage.sql.slots import SqlGenerationSlots
from chat_service.storage.sql.turns import insert_user_message


class SqlConversationStore(SqlGenerationSlots, ConversationStore):
    """`ConversationStore` on the chat service's database (shared with `SqlJobStore`).

    Subclasses the Protocol explicitly so that mypy checks every signature against it.
    """

    def __init__(self, database: SqlDatabase) -> None:
        super().__init__(database)
        self._db = database

    @property
    def database(self) -> SqlDatabase:
        """The database the store runs on (the job store runs on the same one)."""
        return self._db

    @property
    def engine(self) -> AsyncEngine:
        """The engine the store runs on (for health checks and diagnostics)."""
        return self._db.engine

    async def ping(self) -> None:
        """One round trip to the database (`SELECT 1`); raises if it does not answer."""
        await self._db.ping()

    async def create_chat(
        self,
        user_id: str,
        title: str,
        system_prompt: str,
        history_strategy: HistoryStrategy,
        request_id: str | None = None,
        *,
        model: str = "",
    ) -> tuple[Chat, bool]:
        """Create and commit a chat; a retry with the same (user, request_id) returns the first chat and
        False."""
        for _ in range(IDEMPOTENT_ATTEMPTS):
            now = utc_now()
            row = ChatRow(
                id=uuid.uuid4(),
                user_id=user_id,
                title=title,
                system_prompt=system_prompt,
                history_strategy=history_strategy.value,
                request_id=request_id,
                created_at=now,
                last_activity_at=now,
                model=model,
            )
            try:
                async with self._db.sessions.begin() as session:
                    session.add(row)
                return to_chat(row), True
            except IntegrityError:
                if request_id is None:
                    raise
            async with self._db.sessions.begin() as session:
                existing = await session.scalar(
                    select(ChatRow).where(ChatRow.user_id == user_id, ChatRow.request_id == request_id)
                )
            if existing is not None:
                return to_chat(existing), False
        raise RuntimeError(f"create_chat kept colliding on request id {request_id!r}")

    async def get_chat(self, user_id: str, chat_id: uuid.UUID) -> Chat:
        """The user's chat, or `NotFound`."""
        async with self._db.reader.connect() as connection:
            row = (
                await connection.execute(
                    select(ChatRow).where(ChatRow.id == chat_id, ChatRow.user_id == user_id)
                )
            ).first()
        if row is None:
            raise chat_not_found(chat_id)
        return to_chat(row)  # type: ignore[arg-type]

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
        async with self._db.reader.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [to_chat(row) for row in rows]  # type: ignore[arg-type]

    async def update_chat(self, user_id: str, chat_id: uuid.UUID, update: ChatUpdate) -> Chat:
        """Apply the non-None fields of the update and commit; `NotFound` for a missing or foreign chat."""
        values: dict[str, Any] = {}
        if update.title is not None:
            values["title"] = update.title
        if update.system_prompt is not None:
            values["system_prompt"] = update.system_prompt
        if update.history_strategy is not None:
            values["history_strategy"] = update.history_strategy.value
        if update.model is not None:
            values["model"] = update.model
        if not values:
            return await self.get_chat(user_id, chat_id)
        async with self._db.sessions.begin() as session:
            row = await session.scalar(
                sql_update(ChatRow)
                .where(ChatRow.id == chat_id, ChatRow.user_id == user_id)
                .values(**values)
                .returning(ChatRow)
                .execution_options(synchronize_session=False)
            )
        if row is None:
            raise chat_not_found(chat_id)
        return to_chat(row)

    async def delete_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        """Delete the chat and its messages in one transaction; `NotFound` for a missing or foreign chat."""
        async with self._db.sessions.begin() as session:
            # Lock the chat first: a message being added concurrently waits for us, then finds no chat.
            if await session.scalar(own_chat(user_id, chat_id).with_for_update()) is None:
                raise chat_not_found(chat_id)
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

    async def add_user_message(
        self, user_id: str, chat_id: uuid.UUID, content: str, token_count: int, request_id: str | None
    ) -> tuple[Message, bool]:
        """Commit a user message, bump the chat's activity and set its title if empty, in one transaction.
        A retry with the same (chat, request_id) returns the stored message and False."""
        turn = await insert_user_message(
            self._db, user_id, chat_id, content, token_count, request_id, with_history=False
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
        return await insert_user_message(
            self._db,
            user_id,
            chat_id,
            content,
            NOT_COUNTED,
            request_id,
            with_history=with_history,
            lease=lease,
        )

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
        *,
        model: str | None = None,
        usage: UsageEntry | None = None,
    ) -> tuple[Message, bool]:
        """Commit the reply to the user message `reply_to` of this chat (`NotFound` if there is no such
        message), recording `question_tokens` as that message's token count if given and `usage` (with
        its totals) if given; a second reply to the same message returns the stored one and False, and
        records nothing."""
        for _ in range(IDEMPOTENT_ATTEMPTS):
            now = utc_now()
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
                model=model,
            )
            try:
                async with self._db.sessions.begin() as session:
                    await touch_chat(session, user_id, chat_id, now, None)
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
                        raise message_not_found(reply_to)
                    session.add(row)
                    if usage is not None:
                        # The reply first: if it collides (a retry), nothing of this usage is written.
                        await session.flush()
                        entry = dataclasses.replace(usage, chat_id=chat_id, message_id=row.id)
                        await insert_usage(session, entry, now, is_postgresql=self._db.is_postgresql)
                return to_message(row), True
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
        async with self._db.sessions.begin() as session:
            row = await session.scalar(_reply_to(user_id, user_message_id))
        return to_message(row) if row is not None else None

    async def claim_completion(self, user_id: str, message_id: uuid.UUID, lease: Lease) -> bool:
        async with self._db.sessions.begin() as session:
            return await _claim(session, user_id, message_id, lease)

    async def claim_reply(self, user_id: str, message_id: uuid.UUID, lease: Lease) -> ReplyClaim:
        """The stored reply, else the lease: one transaction where a retry took two."""
        async with self._db.sessions.begin() as session:
            reply = await session.scalar(_reply_to(user_id, message_id))
            if reply is not None:
                return ReplyClaim(to_message(reply), False)
            return ReplyClaim(None, await _claim(session, user_id, message_id, lease))

    async def release_completion(self, message_id: uuid.UUID, holder: str) -> None:
        async with self._db.sessions.begin() as session:
            await session.execute(
                sql_update(MessageRow)
                .where(MessageRow.id == message_id, MessageRow.running_on == holder)
                .values(running_on=None, lease_until=None)
                .execution_options(synchronize_session=False)
            )

    async def end_turn_unanswered(
        self, user_id: str, message_id: uuid.UUID, holder: str, token_count: int | None
    ) -> None:
        """One UPDATE where a failed turn took two (`record_token_count`, `release_completion`)."""
        held = MessageRow.running_on == holder
        values: dict[str, Any] = {
            "running_on": case((held, None), else_=MessageRow.running_on),
            "lease_until": case((held, None), else_=MessageRow.lease_until),
        }
        if token_count is not None:
            values["token_count"] = token_count
        async with self._db.sessions.begin() as session:
            await session.execute(
                sql_update(MessageRow)
                .where(MessageRow.id == message_id, MessageRow.user_id == user_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

    async def chat_of_message(self, user_id: str, message_id: uuid.UUID) -> uuid.UUID:
        async with self._db.reader.connect() as connection:
            chat_id = await connection.scalar(
                select(MessageRow.chat_id).where(MessageRow.id == message_id, MessageRow.user_id == user_id)
            )
        if chat_id is None:
            raise message_not_found(message_id)
        return chat_id  # type: ignore[no-any-return]

    async def stored_turn(self, user_id: str, message_id: uuid.UUID) -> StoredTurn:
        """One connection where answering a stored question took three calls (`chat_of_message`,
        `get_chat`, `history`); each statement in autocommit, as those calls were."""
        async with self._db.reader.connect() as connection:
            chat = (
                await connection.execute(
                    select(ChatRow)
                    .join(MessageRow, MessageRow.chat_id == ChatRow.id)
                    .where(
                        MessageRow.id == message_id,
                        MessageRow.user_id == user_id,
                        ChatRow.user_id == user_id,
                    )
                )
            ).first()
            if chat is None:
                raise message_not_found(message_id)
            history = await read_history(connection, chat.id)
        for position, message in enumerate(history):
            if message.id == message_id:
                return StoredTurn(to_chat(chat), message, history[: position + 1])  # type: ignore[arg-type]
        raise message_not_found(message_id)

    async def _require_chat(self, session: AsyncSession, user_id: str, chat_id: uuid.UUID) -> None:
        if await session.scalar(own_chat(user_id, chat_id)) is None:
            raise chat_not_found(chat_id)

    async def history(
        self, user_id: str, chat_id: uuid.UUID, after_seq: int | None = None
    ) -> Sequence[Message]:
        """Every message of the chat (after `after_seq` if given) oldest first; `NotFound` as for get_chat."""
        return await self._read_messages(user_id, chat_id, chat_messages(user_id, chat_id, after_seq))

    async def messages_page(
        self, user_id: str, chat_id: uuid.UUID, limit: int, after_seq: int | None
    ) -> Sequence[Message]:
        """Up to `limit` messages oldest first, strictly after `after_seq`; `NotFound` as for get_chat."""
        return await self._read_messages(
            user_id, chat_id, chat_messages(user_id, chat_id, after_seq).limit(max(limit, 0))
        )

    async def _read_messages(
        self, user_id: str, chat_id: uuid.UUID, query: Select[MessageRow]
    ) -> Sequence[Message]:
        async with self._db.reader.connect() as connection:
            rows = (await connection.execute(query)).all()
            # An empty result is either an empty chat or nobody's (or someone else's) chat.
            if not rows and (await connection.execute(own_chat(user_id, chat_id))).first() is None:
                raise chat_not_found(chat_id)
        return [to_message(row) for row in rows]  # type: ignore[arg-type]

    async def latest_summary(self, user_id: str, chat_id: uuid.UUID) -> Message | None:
        """The newest message of the chat carrying a summary; `NotFound` as for get_chat."""
        async with self._db.sessions.begin() as session:
            row = await session.scalar(
                chat_messages(user_id, chat_id, None)
                .where(MessageRow.summary.is_not(None))
                .order_by(None)
                .order_by(MessageRow.seq.desc())
                .limit(1)
            )
            if row is None:
                await self._require_chat(session, user_id, chat_id)
        return to_message(row) if row is not None else None

    async def save_summary(self, user_id: str, message_id: uuid.UUID, summary: str) -> None:
        """Store `summary` on the user's message `message_id`; `NotFound` if there is no such message."""
        await self._update_message(user_id, message_id, summary=summary)

    async def _update_message(self, user_id: str, message_id: uuid.UUID, **values: Any) -> None:
        """Set `values` on the user's message `message_id`; `NotFound` if the user has no such message."""
        async with self._db.sessions.begin() as session:
            updated = await session.scalar(
                sql_update(MessageRow)
                .where(MessageRow.id == message_id, MessageRow.user_id == user_id)
                .values(**values)
                .returning(MessageRow.seq)
                .execution_options(synchronize_session=False)
            )
        if updated is None:
            raise message_not_found(message_id)


def _reply_to(user_id: str, user_message_id: uuid.UUID) -> Select[MessageRow]:
    return select(MessageRow).where(MessageRow.reply_to == user_message_id, MessageRow.user_id == user_id)


async def _claim(session: AsyncSession, user_id: str, message_id: uuid.UUID, lease: Lease) -> bool:
    """`claim_completion` inside the caller's transaction."""
    now = utc_now()
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
        raise message_not_found(message_id)
    return False
