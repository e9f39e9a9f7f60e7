"""Waiting for a condition that lives in another process (a log file, a server's admin state)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str, timeout_s: float = 15.0) -> None:
    """Wait until `check()` holds. State in another process can only be read, not subscribed to, so
    this polls it; the wait ends on the condition, never on a guess of how long it takes, and the
    timeout only turns a hang into a failure that says what never happened."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                result = check()
                if await result if isinstance(result, Awaitable) else result:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"after {timeout_s:.0f} s: {what}") from None


async def until(condition: Callable[[], bool], passes: int = 1000) -> None:
    """Let the event loop's other tasks run until `condition` (which only they can change) holds: no
    timer, just passes of the loop, and a failure if it never holds."""
    for _ in range(passes):
        if condition():
            return
        await asyncio.sleep(0)  # one pass of the event loop
    raise AssertionError("the condition never held")


def eventually_sync(
    check: Callable[[], bool], what: str, timeout_s: float = 15.0, detail: Callable[[], str] | None = None
) -> None:
    """`eventually` for synchronous tests and fixtures (a browser driven by playwright's sync API, a
    server starting). `detail()`, if given, is added to the timeout's message (a server's log)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s:.0f} s: {what}" + (f"\n{detail()}" if detail else ""))
        threading.Event().wait(0.05)
