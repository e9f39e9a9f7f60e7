"""The SQLAlchemy job store: a job is a row answering one stored user message (the queue holds only its
id). Idempotent on that message, like the conversation store is on request ids (see `conversations`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import case, delete, func, select
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import aliased

from chat_service.domain import Job, JobRequest, JobState, Role
from chat_service.storage.base import JobStore, LimitReached
from chat_service.storage.models import JobRow, MessageRow
from chat_service.storage.sql.database import JOBS_LOCK, SqlDatabase
from chat_service.storage.sql.rows import (
    IDEMPOTENT_ATTEMPTS,
    job_not_found,
    message_not_found,
    to_job,
    utc_now,
)

_UNFINISHED_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


class SqlJobStore(JobStore):
    """`JobStore` on the chat service's database (shared with `SqlConversationStore`).

    Subclasses the Protocol explicitly so that mypy checks every signature against it.
    """

    def __init__(self, database: SqlDatabase) -> None:
        self._db = database

    @property
    def engine(self) -> AsyncEngine:
        """The engine the store runs on (for health checks and diagnostics)."""
        return self._db.engine

    async def create_job(self, request: JobRequest, max_active: int = 0) -> tuple[Job, bool]:
        """Commit a queued job for the user's message `request.user_message_id` (one job per message);
        with `max_active`, only while the user has fewer unfinished jobs (`LimitReached`)."""
        for _ in range(IDEMPOTENT_ATTEMPTS):
            created_at = utc_now()
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
                created_at=created_at,
                updated_at=created_at,
            )
            try:
                async with self._db.sessions.begin() as session:
                    message = await session.scalar(
                        select(MessageRow.id).where(
                            MessageRow.id == request.user_message_id,
                            MessageRow.chat_id == request.chat_id,
                            MessageRow.user_id == request.user_id,
                            MessageRow.role == Role.USER.value,
                        )
                    )
                    if message is None:
                        raise message_not_found(request.user_message_id)
                    if max_active:
                        await self._db.lock_user(session, JOBS_LOCK, request.user_id)
                    session.add(row)
                    if max_active:
                        # Inserted before counting: a retry collides here and gets its job back, never
                        # refused; on SQLite the insert takes the write lock the count needs.
                        await session.flush()
                        await self._check_active_jobs(session, request.user_id, row.id, max_active)
                return to_job(row), True
            except IntegrityError:
                pass
            async with self._db.sessions.begin() as session:
                existing = await session.scalar(
                    select(JobRow).where(
                        JobRow.user_message_id == request.user_message_id,
                        JobRow.user_id == request.user_id,
                    )
                )
            if existing is not None:
                return to_job(existing), False
        raise RuntimeError(f"create_job kept colliding on message {request.user_message_id}")

    async def get_job(self, user_id: str, job_id: uuid.UUID) -> Job:
        async with self._db.sessions.begin() as session:
            row = await session.scalar(select(JobRow).where(JobRow.id == job_id, JobRow.user_id == user_id))
        if row is None:
            raise job_not_found(job_id)
        return to_job(row)

    async def load_job(self, job_id: uuid.UUID) -> Job | None:
        async with self._db.sessions.begin() as session:
            row = await session.scalar(select(JobRow).where(JobRow.id == job_id))
        return to_job(row) if row is not None else None

    async def update_job(
        self, job_id: uuid.UUID, state: JobState, attempts: int, error: str | None = None
    ) -> None:
        updated_at = utc_now()
        async with self._db.sessions.begin() as session:
            await session.execute(
                sql_update(JobRow)
                .where(JobRow.id == job_id)
                .values(
                    state=state.value,
                    attempts=attempts,
                    error=error,
                    updated_at=updated_at,
                    # A job a worker reports on was delivered, so queued: never one for the sweeper.
                    published_at=case((JobRow.published_at.is_(None), updated_at), else_=JobRow.published_at),
                )
                .execution_options(synchronize_session=False)
            )

    async def mark_job_published(self, job_id: uuid.UUID) -> None:
        async with self._db.sessions.begin() as session:
            await session.execute(
                sql_update(JobRow)
                .where(JobRow.id == job_id, JobRow.published_at.is_(None))
                .values(published_at=utc_now())
                .execution_options(synchronize_session=False)
            )

    async def unpublished_jobs(self, created_before: datetime, limit: int) -> Sequence[Job]:
        async with self._db.sessions.begin() as session:
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
            return [to_job(row) for row in rows]

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
        async with self._db.sessions.begin() as session:
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
        async with self._db.sessions.begin() as session:
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
