"""Bring a conversation-store database to the newest Alembic revision, from inside the service.

No alembic.ini is needed at runtime: the configuration is built here and points at the migration scripts
shipped in `chat_service/migrations`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Arbitrary but fixed key: replicas that start together take turns instead of racing to create tables.
_PG_MIGRATION_LOCK_KEY = 0x63686174_6D657368  # "chatmesh"


def alembic_config() -> Config:
    """An Alembic configuration for the chat store's migrations, without any ini file."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _upgrade(connection: Connection, config: Config) -> None:
    if connection.dialect.name == "postgresql":
        # Held until this transaction ends; PostgreSQL DDL is transactional, so the whole upgrade
        # commits or rolls back as one.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Apply every pending migration; a database already at head is left as it is."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade, alembic_config())
