"""Completion leases: which replica is generating a user message's reply, until when.

Adds nullable `messages.running_on` and `messages.lease_until` (NULL: nobody claims the completion, as
for every message stored before this revision).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add `messages.running_on` and `messages.lease_until`."""
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("running_on", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop both columns."""
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("running_on")
