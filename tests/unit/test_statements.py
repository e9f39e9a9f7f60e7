"""watch_statements: every statement's start paired with its end, the error passed when it raised."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from chatmesh.common.statements import statement_operation, watch_statements


async def test_each_statement_starts_and_ends_once_with_its_error_if_it_raised() -> None:
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    seen: list[tuple[str, str | None]] = []
    watch_statements(
        engine,
        statement_operation,
        lambda op, error: seen.append((op, type(error).__name__ if error else None)),
    )
    other: list[str] = []
    watch_statements(engine, statement_operation, lambda op, error: other.append(op))
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            with pytest.raises(OperationalError):
                await connection.execute(text("SELEC 1"))
            await connection.execute(text("  with x as (select 1) select * from x"))
    finally:
        await engine.dispose()
    assert seen == [("SELECT", None), ("SELEC", "OperationalError"), ("WITH", None)]
    assert other == ["SELECT", "SELEC", "WITH"], "two watches keep their own pairs"


def test_an_empty_statement_is_sql() -> None:
    assert statement_operation("   ") == "SQL"
