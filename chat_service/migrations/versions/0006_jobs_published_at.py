"""Jobs the queue never took: `jobs.published_at`, and a partial index on the jobs without it.

A job is stored, then its id published to the queue; a replica that stops in between leaves a job that
no worker will ever see. `published_at` is set once the queue took the id (or a worker reported on the
job); the sweeper publishes the queued jobs still without it after a grace period. Jobs stored before
this revision that a worker has seen, or that finished, count as published; those still queued and never
delivered are left to the sweeper, which publishes them once (the queue drops a copy of an id it holds).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNPUBLISHED = sa.text("published_at IS NULL")


def upgrade() -> None:
    """Add `jobs.published_at` and `ix_jobs_unpublished`."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET published_at = updated_at WHERE NOT (state = 'queued' AND attempts = 0)")
    op.create_index(
        "ix_jobs_unpublished",
        "jobs",
        ["created_at"],
        postgresql_where=_UNPUBLISHED,
        sqlite_where=_UNPUBLISHED,
    )


def downgrade() -> None:
    """Drop both."""
    op.drop_index("ix_jobs_unpublished", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("published_at")
