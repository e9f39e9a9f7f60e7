"""Chats have a model, and replies record the model that wrote them.

Adds `chats.model` (not null, server default ''): the model that answers the chat's next turn. Chats made
before this revision get '', which means the deployment's default model, so they keep being answered
by whichever model the deployment serves by default. Adds nullable `messages.model`: for assistant
messages, the model that wrote the reply (NULL for user messages and for replies stored before).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add `chats.model` and `messages.model`."""
    with op.batch_alter_table("chats") as batch:
        batch.add_column(sa.Column("model", sa.String(255), nullable=False, server_default=""))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("model", sa.String(255), nullable=True))


def downgrade() -> None:
    """Drop both."""
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("model")
    with op.batch_alter_table("chats") as batch:
        batch.drop_column("model")
