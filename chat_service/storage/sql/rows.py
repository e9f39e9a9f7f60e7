"""What the SQL stores share: rows to domain values, the not-found errors, and the statements on a
user's chats and messages that both the conversation and the job store build on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Select, Table, Update, case, select
from sqlalchemy import update as sql_update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from chat_service.domain import (
    Chat,
    FinishReason,
    HistoryStrategy,
    Job,
    JobRequest,
    JobState,
    Message,
    Role,
)
from chat_service.storage.models import ChatRow, JobRow, MessageRow
from chatmesh.common.errors import NotFound

TITLE_MAX_CHARS = 80
_ELLIPSIS = "…"
# A racing delete can remove the row we collided with before we read it back, and inserting again is then
# right; a collision that persists across attempts is a bug, not a race.
IDEMPOTENT_ATTEMPTS = 3


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


def utc_now() -> datetime:
    return datetime.now(UTC)


def chat_not_found(chat_id: uuid.UUID) -> NotFound:
    return NotFound(f"chat {chat_id} not found")


def message_not_found(message_id: uuid.UUID) -> NotFound:
    return NotFound(f"message {message_id} not found")


def job_not_found(job_id: uuid.UUID) -> NotFound:
    return NotFound(f"job {job_id} not found")


def to_chat(row: ChatRow) -> Chat:
    return Chat(
        id=row.id,
        user_id=row.user_id,
        title=row.title,
        system_prompt=row.system_prompt,
        history_strategy=HistoryStrategy(row.history_strategy),
        created_at=row.created_at,
        last_activity_at=row.last_activity_at,
        model=row.model,
    )


def to_message(row: MessageRow) -> Message:
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
        model=row.model,
    )


def to_job(row: JobRow) -> Job:
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


def own_chat(user_id: str, chat_id: uuid.UUID) -> Select[uuid.UUID]:
    return select(ChatRow.id).where(ChatRow.id == chat_id, ChatRow.user_id == user_id)


def chat_messages(user_id: str, chat_id: uuid.UUID, after_seq: int | None) -> Select[MessageRow]:
    """The chat's messages in seq order, only if the chat is the user's.

    Ownership is an uncorrelated EXISTS on the chat's primary key, which PostgreSQL runs once before the
    scan. Filtering on the messages' own user_id column instead would be equivalent, but the planner takes
    it for an independent condition, underestimates the rows of a long chat and switches to a bitmap scan
    plus sort of everything after the cursor.
    """
    query = select(MessageRow).where(MessageRow.chat_id == chat_id, own_chat(user_id, chat_id).exists())
    if after_seq is not None:
        query = query.where(MessageRow.seq > after_seq)
    return query.order_by(MessageRow.seq)


async def read_history(connection: AsyncConnection, chat_id: uuid.UUID) -> list[Message]:
    """The chat's messages in seq order, ownership unchecked: for callers whose statement checks it."""
    rows = await connection.execute(
        select(MessageRow).where(MessageRow.chat_id == chat_id).order_by(MessageRow.seq)
    )
    return [to_message(row) for row in rows]  # type: ignore[arg-type]


def bump_chat(user_id: str, chat_id: uuid.UUID, when: datetime, title: str | None) -> Update:
    """UPDATE the user's chat: activity time `when`, an empty title filled with `title`; RETURNING the row
    (none: not the user's chat). Taking the chat's row lock first is what orders its messages' writes."""
    chats = cast(Table, ChatRow.__table__)
    values: dict[str, Any] = {"last_activity_at": when}
    if title:
        values["title"] = case((chats.c.title == "", title), else_=chats.c.title)
    return (
        sql_update(chats)
        .where(chats.c.id == chat_id, chats.c.user_id == user_id)
        .values(**values)
        .returning(*chats.c)
    )


async def touch_chat(
    executor: AsyncConnection | AsyncSession,
    user_id: str,
    chat_id: uuid.UUID,
    when: datetime,
    title: str | None,
) -> Row[Any]:
    """Bump the chat's activity time (and fill an empty title) and return its row, or raise `NotFound`.
    A Core statement, so it serves both the ORM transactions and a plain connection's."""
    bumped = (await executor.execute(bump_chat(user_id, chat_id, when, title))).first()
    if bumped is None:
        raise chat_not_found(chat_id)
    return bumped
