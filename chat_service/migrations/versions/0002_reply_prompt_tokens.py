"""Keep the prompt size of each assistant reply, so a retried completion reports the original usage.

Adds nullable `messages.prompt_tokens`: NULL for user messages and for replies stored before this
revision (their usage is reported with 0 prompt tokens on replay).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add `messages.prompt_tokens`."""
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("prompt_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Drop `messages.prompt_tokens`."""
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("prompt_tokens")
