"""Storing a user message, the first write of every turn: on the path to the first token, so it is as
few round trips as each database allows (one statement on PostgreSQL, one short transaction on SQLite),
and idempotent on the client's request id."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, insert, literal, select
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from chat_service.domain import Message, Role
from chat_service.storage.base import Lease, TurnStart
from chat_service.storage.models import ChatRow, MessageRow
from chat_service.storage.sql.database import SqlDatabase
from chat_service.storage.sql.rows import (
    IDEMPOTENT_ATTEMPTS,
    bump_chat,
    chat_not_found,
    read_history,
    title_from_content,
    to_chat,
    to_message,
    touch_chat,
    utc_now,
)


async def insert_user_message(
    db: SqlDatabase,
    user_id: str,
    chat_id: uuid.UUID,
    content: str,
    token_count: int,
    request_id: str | None,
    *,
    with_history: bool,
    lease: Lease | None = None,
) -> TurnStart:
    """Bump the chat (owner check, activity, title), read its history (`with_history`), insert the user
    message (claimed by `lease` if given). A retry with the same (chat, request_id) returns the stored
    message, `created` False and no history."""
    for _ in range(IDEMPOTENT_ATTEMPTS):
        stored_at = utc_now()
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
            "created_at": stored_at,
            "running_on": lease.holder if lease else None,
            "lease_until": stored_at + timedelta(seconds=lease.seconds) if lease else None,
        }
        try:
            if db.is_postgresql:
                chat_row, seq, earlier = await _insert_turn_one_statement(
                    db, user_id, chat_id, stored_at, title, values, with_history
                )
            else:
                chat_row, seq, earlier = await _insert_turn_transaction(
                    db, user_id, chat_id, stored_at, title, values, with_history
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
                created_at=stored_at,
            )
            return TurnStart(to_chat(chat_row), message, True, [*earlier, message])  # type: ignore[arg-type]
        except IntegrityError:
            if request_id is None:
                raise
        if (stored := await _stored_copy(db, user_id, chat_id, request_id)) is not None:
            return stored
    raise RuntimeError(f"add_user_message kept colliding on request id {request_id!r}")


async def _stored_copy(
    db: SqlDatabase, user_id: str, chat_id: uuid.UUID, request_id: str
) -> TurnStart | None:
    """The turn a first attempt with `request_id` stored (None if a racing delete removed it since)."""
    async with db.sessions.begin() as session:
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
    if existing is None or chat_row is None:
        return None
    return TurnStart(to_chat(chat_row), to_message(existing), False, [])


async def _insert_turn_transaction(
    db: SqlDatabase,
    user_id: str,
    chat_id: uuid.UUID,
    stored_at: datetime,
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
    async with db.engine.begin() as connection:
        chat_row = await touch_chat(connection, user_id, chat_id, stored_at, title)
        earlier = []
        if with_history:
            earlier = await read_history(connection, chat_id)
        seq = (
            await connection.execute(insert(messages).values(**values).returning(messages.c.seq))
        ).scalar_one()
    return chat_row, seq, earlier


async def _insert_turn_one_statement(
    db: SqlDatabase,
    user_id: str,
    chat_id: uuid.UUID,
    stored_at: datetime,
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
    touched = bump_chat(user_id, chat_id, stored_at, title).cte("touched")
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
    reading = asyncio.ensure_future(_history_rows(db, chat_id)) if with_history else None
    try:
        async with db.reader.connect() as connection:
            row = (
                await connection.execute(
                    select(touched, inserted.c.seq).join_from(
                        touched, inserted, touched.c.id == inserted.c.chat_id
                    )
                )
            ).first()
        if row is None:
            raise chat_not_found(chat_id)
        seq: int = row.seq
        earlier = [m for m in await reading if m.seq < seq] if reading is not None else []
    finally:
        if reading is not None and not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    return row, seq, earlier


async def _history_rows(db: SqlDatabase, chat_id: uuid.UUID) -> list[Message]:
    """The chat's messages in seq order on a connection of its own, ownership unchecked (the caller
    checks it)."""
    async with db.reader.connect() as connection:
        return await read_history(connection, chat_id)
