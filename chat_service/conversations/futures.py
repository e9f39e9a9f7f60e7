"""Work started beside a turn and perhaps never needed (a cache lookup, a token count)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

_T = TypeVar("_T")


def discard(future: asyncio.Future[Any] | None) -> None:
    """Cancel a count or lookup nobody needs any more; retrieve the error of one that failed, so asyncio
    does not log it as never retrieved (whoever needed it has reported it)."""
    if future is None:
        return
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


def result_if_done(future: asyncio.Future[_T] | None) -> _T | None:
    """The result, if it is known by now (None while running, and if cancelled or failed)."""
    if future is None or not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()
