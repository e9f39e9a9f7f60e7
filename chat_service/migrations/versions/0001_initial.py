"""Initial schema: chats and their messages, one row per message.

`chats` is listed per user by recent activity through `ix_chats_user_activity` (user_id, last_activity_at,
id), and is idempotent on a client request id through `uq_chats_user_request`. `messages` is read per chat
in `seq` order through `ix_messages_chat_seq`; `uq_messages_chat_request` and `uq_messages_reply_to` make a
retried user message or assistant reply land at most once. Timestamps are timezone-aware UTC.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create `chats` and `messages` with their indexes."""
    op.create_table(
        "chats",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("system_prompt", sa.Text(), nullable=False),
        sa.Column("history_strategy", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_activity_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chats")),
        sa.UniqueConstraint("user_id", "request_id", name="uq_chats_user_request"),
    )
    op.create_index("ix_chats_user_activity", "chats", ["user_id", "last_activity_at", "id"])

    op.create_table(
        "messages",
        # INTEGER on SQLite so that the column aliases the rowid (and AUTOINCREMENT applies).
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("chat_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("finish_reason", sa.String(length=16), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("reply_to", sa.Uuid(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["chat_id"], ["chats.id"], name=op.f("fk_messages_chat_id_chats"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_messages")),
        sa.UniqueConstraint("id", name=op.f("uq_messages_id")),
        sa.UniqueConstraint("chat_id", "request_id", name="uq_messages_chat_request"),
        sa.UniqueConstraint("reply_to", name="uq_messages_reply_to"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_messages_chat_seq", "messages", ["chat_id", "seq"])


def downgrade() -> None:
    """Drop both tables (and every stored conversation)."""
    op.drop_index("ix_messages_chat_seq", table_name="messages")
    op.drop_table("messages")
    op.drop_index("ix_chats_user_activity", table_name="chats")
    op.drop_table("chats")
