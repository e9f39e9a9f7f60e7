"""SQLAlchemy ORM tables of the conversation store.

Messages are rows keyed by a global `seq`, never a JSON blob per chat. The indexes are chosen for the two
hot reads: "list my chats" (`ix_chats_user_activity`, keyset-paged on activity) and "history of chat X"
(`ix_messages_chat_seq`). The unique constraints carry the idempotency guarantees: a retried request can
never store a second chat, user message or reply, however the retries interleave.

Schema changes go through Alembic (`chat_service/migrations`); keep the revisions in step with this module
(the storage tests compare the migrated schema against these models).
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, identical on every backend, so migrations can refer to them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores `timestamptz` and asyncpg already returns aware values. SQLite has no timestamp type:
    SQLAlchemy stores ISO text and drops the offset, so values are normalised to naive UTC on the way in
    (which also keeps the text sortable) and marked UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC; naive datetimes are refused rather than guessed at."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware values")
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Uint64(TypeDecorator[int]):
    """An unsigned 64-bit integer (a sampling seed) in a signed BIGINT column, on every backend.

    PostgreSQL's BIGINT and SQLite's INTEGER are signed 64-bit, and refuse 2^63 and above. Stored in two's
    complement: values below 2^63 as themselves (so rows written before this type read back unchanged),
    values from 2^63 as value - 2^64 (negative), mapped back on the way out. Order and arithmetic in SQL
    are not those of the unsigned values: only store and read such columns, never compare them in SQL.
    """

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        """The signed value stored for `value` (0 <= value < 2^64)."""
        if value is None:
            return None
        if not 0 <= value < 2**64:
            raise ValueError(f"{value} is not an unsigned 64-bit integer")
        return value - 2**64 if value >= 2**63 else value

    def process_result_value(self, value: int | None, dialect: Dialect) -> int | None:
        """The unsigned value that the stored `value` stands for."""
        if value is None:
            return None
        return value + 2**64 if value < 0 else value


class Base(DeclarativeBase):
    """Declarative base holding the store's metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ChatRow(Base):
    """One conversation, owned by `user_id`."""

    __tablename__ = "chats"
    __table_args__ = (
        # Serves "list my chats, most recent activity first" as a backward index scan with the keyset
        # cursor (last_activity_at, id) in the index condition: no sort, no scan of other users' chats.
        Index("ix_chats_user_activity", "user_id", "last_activity_at", "id"),
        UniqueConstraint("user_id", "request_id", name="uq_chats_user_request"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    title: Mapped[str] = mapped_column(Text)
    system_prompt: Mapped[str] = mapped_column(Text)
    history_strategy: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_activity_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Added in migration 0007: the model that answers the chat's next turn; '' (the chats made before)
    # means the deployment's default model.
    model: Mapped[str] = mapped_column(String(255), server_default="")


class MessageRow(Base):
    """One message of a chat. `seq` orders messages globally and therefore within a chat."""

    __tablename__ = "messages"
    __table_args__ = (
        # History and message pages: equality on chat_id, range and order on seq. Also indexes the
        # foreign key, so deleting a chat's messages does not scan the table.
        Index("ix_messages_chat_seq", "chat_id", "seq"),
        UniqueConstraint("chat_id", "request_id", name="uq_messages_chat_request"),
        UniqueConstraint("reply_to", name="uq_messages_reply_to"),
        # AUTOINCREMENT keeps SQLite from reusing the seq of a deleted newest message, so seq is
        # strictly increasing on both backends.
        {"sqlite_autoincrement": True},
    )

    # INTEGER (not BIGINT) on SQLite, because only `INTEGER PRIMARY KEY` aliases the rowid and
    # autoincrements there.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    chat_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("chats.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(128))
    reply_to: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    summary: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Added in migration 0002; NULL for user messages and for replies stored before it.
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    # Added in migration 0004, user messages only: which chat replica is generating the reply, and until
    # when that claim holds unless renewed. A retry on another replica waits for that reply instead of
    # generating a second one, and takes the completion over once the claim has lapsed.
    running_on: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Added in migration 0007, assistant messages only: the model that wrote the reply (NULL for replies
    # stored before it).
    model: Mapped[str | None] = mapped_column(String(255))


class JobRow(Base):
    """An asynchronous completion: the user message it answers and how far its worker got. The reply is
    the message whose `reply_to` is `user_message_id` (one at most), so a job cannot answer twice."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("user_message_id", name="uq_jobs_user_message_id"),
        # Added in migration 0005: a submission counts the user's unfinished jobs against their limit.
        Index("ix_jobs_user_state", "user_id", "state"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    chat_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("chats.id", ondelete="CASCADE"), index=True)
    user_message_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("messages.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    temperature: Mapped[float | None] = mapped_column(Float)
    top_p: Mapped[float | None] = mapped_column(Float)
    # The full uint64 range of the contract's seed, in a BIGINT (see Uint64; no schema change).
    seed: Mapped[int | None] = mapped_column(Uint64)
    use_cache: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Added in migration 0006: when the queue took the job's id; NULL while it has not (its replica
    # stopped between storing and queueing it), which is how the sweeper finds it (ix_jobs_unpublished).
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class GenerationSlotRow(Base):
    """A completion stream one user has running on some replica (migration 0005): what the per-user limit
    on concurrent completions counts, across every replica sharing the database. `holder` (the replica)
    renews `lease_until` while the stream runs and deletes the row when it ends; the row of a replica
    that died stops counting once its lease lapses."""

    __tablename__ = "generation_slots"
    __table_args__ = (Index("ix_generation_slots_user_lease", "user_id", "lease_until"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    holder: Mapped[str] = mapped_column(String(64))
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime)
    lease_until: Mapped[datetime] = mapped_column(UtcDateTime)


# Only the jobs not queued yet (a handful at most, whatever the table's size) are in it: the sweeper's
# periodic look for them reads nothing else.
Index(
    "ix_jobs_unpublished",
    JobRow.created_at,
    postgresql_where=JobRow.published_at.is_(None),
    sqlite_where=JobRow.published_at.is_(None),
)


# Accounting (migration 0008). No foreign key to chats or messages: usage outlives the chats it was for
# (deleting a chat keeps what its replies cost), so chat_id and message_id are plain columns.


class UsageRecordRow(Base):
    """What one generation used (see `chat_service.accounting.values.UsageEntry`), charged to `user_group`
    (the user's group as noted when it was recorded). `day` is the UTC date of `created_at`, stored so
    that "usage by day" groups and ranges on a plain indexed column on every backend."""

    __tablename__ = "usage_records"
    __table_args__ = (
        # One record per reply, and per (user, request key): what makes recording idempotent. NULLs
        # are distinct in unique constraints on both backends, so unkeyed records never collide.
        UniqueConstraint("message_id", name="uq_usage_records_message_id"),
        UniqueConstraint("user_id", "request_key", name="uq_usage_records_user_request"),
        # "My usage since day X" and "the team's usage since day X" (optionally one group's).
        Index("ix_usage_records_user_day", "user_id", "day"),
        Index("ix_usage_records_group_day", "user_group", "day"),
        Index("ix_usage_records_day", "day"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    user_group: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(255))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))
    chat_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    message_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    request_key: Mapped[str | None] = mapped_column(String(255))
    day: Mapped[date] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class UsageTotalRow(Base):
    """The charged tokens of a user or group (`scope`, `subject`) in one day or month (`period`,
    `period_start`): what a budget check reads, kept up to date in each usage record's transaction."""

    __tablename__ = "usage_totals"

    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    period_start: Mapped[date] = mapped_column(Date, primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger)


class BudgetOverrideRow(Base):
    """A budget that replaces the default of settings for one user or group and period."""

    __tablename__ = "budget_overrides"

    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AccountMemberRow(Base):
    """The group a user's usage is charged to, as last noted ("" for none)."""

    __tablename__ = "account_members"

    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_group: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ApiKeyRow(Base):
    """An API key: never its secret, only the SHA-256 hex of the bearer string. `scopes` is the key's
    scopes separated by spaces ("" for a key made with none)."""

    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("secret_hash", name="uq_api_keys_secret_hash"),
        # "My keys, newest first".
        Index("ix_api_keys_user_created", "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    user_group: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(Text)
    scopes: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
