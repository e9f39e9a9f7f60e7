"""Per-user limits: the `generation_slots` table, and an index to count a user's unfinished jobs.

`generation_slots` holds one row per completion stream running anywhere (a replica's lease on it, renewed
while it runs); the per-user limit on concurrent completions counts a user's live rows. `ix_jobs_user_state`
serves counting a user's queued and running jobs at submission.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create `generation_slots` and `ix_jobs_user_state`."""
    op.create_table(
        "generation_slots",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generation_slots")),
    )
    op.create_index("ix_generation_slots_user_lease", "generation_slots", ["user_id", "lease_until"])
    op.create_index("ix_jobs_user_state", "jobs", ["user_id", "state"])


def downgrade() -> None:
    """Drop both."""
    op.drop_index("ix_jobs_user_state", table_name="jobs")
    op.drop_index("ix_generation_slots_user_lease", table_name="generation_slots")
    op.drop_table("generation_slots")
