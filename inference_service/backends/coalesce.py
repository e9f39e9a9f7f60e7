"""Read a stream ahead and hand over what has piled up, as one batch.

At GPU speed an engine can send tokens faster than the relay forwards them, most of all when the machine
is busy: each forwarded token costs a gRPC message. Reading ahead lets the tokens that arrive while the
previous one is being forwarded go out together, in one message, while a token that finds the relay idle
goes out alone and at once: the first token is never held back to wait for company.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

_T = TypeVar("_T")

_END = object()


async def coalesced(source: AsyncIterator[_T]) -> AsyncGenerator[list[_T], None]:
    """The items of `source` in order, in batches: each batch holds everything that arrived since the
    consumer took the previous one (at least one item). An error of `source` is raised after the items
    before it. Closing this generator cancels the reading of `source` (and so `source` itself)."""
    # The first item is read here, not through the reader task: it goes out without waiting a turn of
    # the event loop for the task to hand it over. Reading ahead starts as it goes out.
    items = aiter(source)
    reader: asyncio.Future[None] | None = None
    try:
        try:
            first = await anext(items)
        except StopAsyncIteration:
            return
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for item in items:
                    queue.put_nowait(item)
            except Exception as exc:  # handed over to the consumer, in order
                queue.put_nowait(_Failure(exc))
            finally:
                queue.put_nowait(_END)

        reader = asyncio.ensure_future(pump())
        yield [first]
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            taken: list[_T] = []
            for entry in batch:
                if entry is _END:
                    if taken:
                        yield taken
                    return
                if isinstance(entry, _Failure):
                    if taken:
                        yield taken
                    raise entry.error
                taken.append(entry)  # type: ignore[arg-type]
            yield taken
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        # Cancelling a reader that never ran leaves the source suspended where it is: close it too (a
        # no-op once it has finished).
        if isinstance(items, AsyncGenerator):
            await items.aclose()


class _Failure:
    def __init__(self, error: Exception) -> None:
        self.error = error
