"""The SQL stores of the chat service, on PostgreSQL (asyncpg) or SQLite (aiosqlite):

- `database`: the engine, its sessions and readers (`SqlDatabase`, `open_sql_database`);
- `conversations`: `SqlConversationStore` (chats, messages, completion leases; slots from `slots`, a
  user message's insert from `turns`);
- `jobs`: `SqlJobStore`;
- `accounts`: `SqlAccountStore` (usage records and totals, budget overrides, API keys);
- `rows`: what both stores share (rows to domain values, statements on a user's chats).

The stores run on one `SqlDatabase`; the composition root opens it and builds each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from chat_service.storage.sql.accounts import SqlAccountStore
from chat_service.storage.sql.conversations import SqlConversationStore
from chat_service.storage.sql.database import SqlDatabase, create_store_engine, open_sql_database
from chat_service.storage.sql.jobs import SqlJobStore
from chat_service.storage.sql.rows import TITLE_MAX_CHARS, title_from_content

__all__ = [
    "TITLE_MAX_CHARS",
    "SqlAccountStore",
    "SqlConversationStore",
    "SqlDatabase",
    "SqlJobStore",
    "create_store_engine",
    "open_sql_database",
    "open_sql_store",
    "title_from_content",
]


@asynccontextmanager
async def open_sql_store(
    database_url: str, *, migrate: bool = True, pool_size: int = 10
) -> AsyncIterator[SqlConversationStore]:
    """The conversation store on the database at `database_url` (see `open_sql_database`), for callers
    that need no other store; `SqlJobStore(store.database)` gives the jobs on the same database."""
    async with open_sql_database(database_url, migrate=migrate, pool_size=pool_size) as database:
        yield SqlConversationStore(database)
