"""The database both SQL stores run on: the async engine (PostgreSQL through asyncpg, or SQLite through
aiosqlite), its session factory and autocommit reader, and what the stores share of the dialects (the
per-user advisory lock)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection, ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from chat_service.storage.migrate import upgrade_to_head
from chatmesh.common.errors import Unavailable

# First keys of the PostgreSQL advisory locks that serialize one user's limit checks (the second key is a
# hash of the user id): one namespace per limit, so a user's completions and jobs do not wait on each other.
SLOTS_LOCK = 0x434D0001
JOBS_LOCK = 0x434D0002


class SqlDatabase:
    """An async SQLAlchemy engine whose schema is at the newest migration, and the ways the stores use it:
    `sessions` (ORM transactions), `engine.begin()` (Core transactions) and `reader` (single-statement
    reads in autocommit)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        # Single-statement reads need no transaction of their own: autocommit skips BEGIN/ROLLBACK, and
        # Core rows skip the ORM's identity map. These serve every list and history call.
        self.reader = engine.execution_options(isolation_level="AUTOCOMMIT")

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    async def ping(self) -> None:
        """One round trip to the database (`SELECT 1`); raises if it does not answer."""
        async with self.reader.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def lock_user(self, connection: AsyncConnection | AsyncSession, key: int, user_id: str) -> None:
        """Serialize the user's count-then-take steps until the transaction ends. PostgreSQL: a transaction
        advisory lock on (key, hash of the user), since under READ COMMITTED two transactions would each
        count without the other's uncommitted row. SQLite needs none: the caller writes before it counts,
        and the first write takes the database's single write lock until commit."""
        if self.is_postgresql:
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key, hashtext(:user_id))"),
                {"key": key, "user_id": user_id},
            )


def _async_url(database_url: str) -> URL:
    """Parse the URL, choosing the async driver when a plain `sqlite://` or `postgresql://` is given."""
    url = make_url(database_url)
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        url = url.set(drivername="sqlite+aiosqlite")
    elif url.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        url = url.set(drivername="postgresql+asyncpg")
    return url


def _sqlite_on_connect(dbapi_connection: DBAPIConnection, connection_record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite ships with foreign keys off, per connection.
    cursor.execute("PRAGMA foreign_keys = ON")
    # Readers do not block the writer nor the writer the readers; persistent, but cheap to re-assert.
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


_UNREACHABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)
"""What PostgreSQL (or the way to it) raises while it is down, starting or shutting down."""


def _unreachable(cause: BaseException) -> Unavailable:
    return Unavailable(f"the database cannot be reached ({type(cause).__name__}); retry")


def _unavailable_when_unreachable(context: ExceptionContext) -> None:
    """A database that cannot be reached (down, restarting, a dropped connection) is a dependency that
    is unavailable, not a bug: the call fails with UNAVAILABLE and a message that says so, and a retry
    may succeed. Every other database error stays what it is."""
    original = context.original_exception
    if not isinstance(original, Exception):
        return  # a cancelled call (its connection is dropped as a disconnect) stays cancelled
    if context.is_disconnect or isinstance(original, _UNREACHABLE):
        raise _unreachable(original) from (context.sqlalchemy_exception or original)


def _connect_or_unavailable(
    dialect: Dialect, record: ConnectionPoolEntry, cargs: Sequence[Any], cparams: dict[str, Any]
) -> DBAPIConnection:
    """A new connection, or Unavailable: errors of connecting bypass `handle_error`."""
    try:
        return dialect.connect(*cargs, **cparams)
    except _UNREACHABLE as exc:
        raise _unreachable(exc) from exc


def create_store_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine for the chat service's stores (see `open_sql_database`)."""
    url = _async_url(database_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            # Seconds a writer waits for another connection's write lock before "database is locked".
            connect_args={"timeout": 30},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    if url.get_backend_name() == "postgresql":
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            # No pre-ping: it costs a round trip on every checkout (~0.2 ms of a 0.5 ms read). A connection
            # the server closed fails one request, after which SQLAlchemy invalidates the pool's older
            # connections; recycling keeps idle ones from going stale in between.
            pool_recycle=1800,
            connect_args={"server_settings": {"application_name": "chatmesh-chat"}},
        )
        event.listen(engine.sync_engine, "handle_error", _unavailable_when_unreachable)
        event.listen(engine.sync_engine, "do_connect", _connect_or_unavailable)
        return engine
    raise ValueError(f"unsupported chat database {url.render_as_string(hide_password=True)!r}")


@asynccontextmanager
async def open_sql_database(
    database_url: str, *, migrate: bool = True, pool_size: int = 10
) -> AsyncIterator[SqlDatabase]:
    """Open the chat service's database at `database_url` for the duration of the context.

    `postgresql+asyncpg://...` or `sqlite+aiosqlite:///path/to/chat.db` (plain `postgresql://` and
    `sqlite://` select those drivers). For SQLite the file's directory is created, foreign keys are
    enforced and the journal is in WAL mode. With `migrate`, the schema is brought to the newest Alembic
    revision first. The engine is disposed on exit.
    """
    engine = create_store_engine(database_url, pool_size=pool_size)
    try:
        if migrate:
            await upgrade_to_head(engine)
        yield SqlDatabase(engine)
    finally:
        await engine.dispose()
