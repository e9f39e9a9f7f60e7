"""One way to observe every SQL statement an engine runs (SQLAlchemy's cursor events): metrics time them,
tracing gives each a span. The events come in pairs per connection (before / after, or before / error),
possibly nested, so what `start` returns is kept on a stack in the connection's info until its end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

_T = TypeVar("_T")


def statement_operation(statement: str) -> str:
    """The statement's leading keyword in upper case (`SELECT`, `INSERT`, `WITH`, ...), `SQL` if none."""
    words = statement.split(None, 1)
    return words[0].upper() if words else "SQL"


def watch_statements(
    engine: AsyncEngine,
    start: Callable[[str], _T],
    end: Callable[[_T, BaseException | None], None],
) -> None:
    """Call `start(statement)` before each statement `engine` executes, and `end(what start returned,
    None)` after it, or `end(..., the error)` when it raised."""
    key = object()  # this watch's own stack: several watches may observe one engine

    def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        conn.info.setdefault(key, []).append(start(statement))

    def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        end(conn.info[key].pop(), None)

    def failed(context: Any) -> None:
        started = context.connection.info.get(key) if context.connection is not None else None
        if started:
            end(started.pop(), context.original_exception)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)
    event.listen(engine.sync_engine, "handle_error", failed)
