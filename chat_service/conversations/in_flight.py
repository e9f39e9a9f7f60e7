"""Completions running in this process, so that a retry (same request id) or a job's watcher joins the
one running instead of starting a second: `RunningCompletion` (one completion, followed by every request
for it) and `InFlight` (the registry, by user message id)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from chat_service.conversations.events import CompletionEvent, Failed, Finished, is_terminal
from chatmesh.common.errors import Unavailable

log = logging.getLogger(__name__)


class RunningCompletion:
    """One completion running in this process, followed by every request for it: the one that started it
    and the retries (same request id) that joined it.

    A task of its own drives the completion, so it does not belong to any one caller: it runs while
    anyone follows it. Each follower sees every event from the first, and exactly one terminal event:
    `Finished`, or `Failed` followed by its error raised (the error then becomes the call's status). A
    failure before the stream started has no event, only the raised error.

    When the last follower leaves (cancelled, or its client went away), the completion is *abandoned*:
    the task is cancelled, which stores the reply so far marked cancelled and stops the engine, and the
    follower waits for that before its call ends. A retry arriving meanwhile must not follow it (nobody
    would see a terminal event): it waits until the task is done and then finds the stored reply.
    """

    def __init__(self, events: AsyncGenerator[CompletionEvent, None]) -> None:
        self._events: list[CompletionEvent] = []
        self._changed = asyncio.Event()
        self._followers = 0
        self._error: BaseException | None = None
        self.abandoned = False
        self._task = asyncio.create_task(self._run(events))

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the task is done (also if it was cancelled before it ever ran)."""
        self._task.add_done_callback(lambda _: callback())

    async def _run(self, source: AsyncGenerator[CompletionEvent, None]) -> None:
        try:
            async with aclosing(source) as events:
                async for event in events:
                    self._events.append(event)
                    self._changed.set()
                    self._changed = asyncio.Event()
        except asyncio.CancelledError:
            raise  # abandoned: the source stored what there was
        except Exception as exc:
            # Every follower raises it (after the `Failed` event carrying it, if the stream started).
            self._error = exc
            if self._followers == 0:
                log.warning("a completion nobody follows failed", exc_info=exc)
        finally:
            self._changed.set()

    async def finished(self) -> None:
        """Wait until the task is done, without raising its outcome and without cancelling it."""
        await asyncio.wait({self._task})

    async def follow(self) -> AsyncGenerator[CompletionEvent, None]:
        """Every event from the first, until the terminal one; then raise the error of a failure."""
        assert not self.abandoned, "an abandoned completion has no terminal event for a new follower"
        self._followers += 1
        seen = 0
        try:
            while True:
                changed = self._changed
                while seen < len(self._events):
                    event = self._events[seen]
                    seen += 1
                    yield event
                    if isinstance(event, Failed):
                        raise event.error
                    if isinstance(event, Finished):
                        return
                if self._task.done():
                    break
                await changed.wait()
        finally:
            self._followers -= 1
            ended = self._task.done() or any(is_terminal(e) for e in self._events[-1:])
            if self._followers == 0 and not ended:
                self.abandoned = True
                self._task.cancel()
                # The stored partial reply is part of this call: a client that reads the chat after its
                # cancel took effect finds it.
                await self.finished()
        # The task ended without a terminal event: it failed before the stream started, or the whole
        # process is shutting down and cancelled it.
        if self._error is not None:
            raise self._error
        raise Unavailable("the completion was interrupted; retry with the same request_id")


class InFlight:
    """The completions running in this process, by user message id."""

    def __init__(self) -> None:
        self._running: dict[uuid.UUID, RunningCompletion] = {}

    def run(
        self, message_id: uuid.UUID, events: Callable[[], AsyncGenerator[CompletionEvent, None]]
    ) -> RunningCompletion:
        """The completion of `message_id` running here, started from `events` if there is none yet.

        Synchronous, so that checking and registering cannot interleave with another request's.
        """
        running = self._running.get(message_id)
        if running is not None and not running.abandoned:
            return running
        # (An abandoned one is still winding down; its successor replaces it in the registry.)
        started = RunningCompletion(events())
        self._running[message_id] = started
        started.when_done(lambda: self._forget(message_id, started))
        return started

    def _forget(self, message_id: uuid.UUID, running: RunningCompletion) -> None:
        if self._running.get(message_id) is running:
            del self._running[message_id]

    def following(self, message_id: uuid.UUID) -> RunningCompletion | None:
        """The completion of `message_id` if one runs here that a new follower may join."""
        running = self._running.get(message_id)
        return None if running is None or running.abandoned else running

    async def join(
        self, message_id: uuid.UUID, resume: Callable[[], AsyncGenerator[CompletionEvent, None]]
    ) -> RunningCompletion:
        """The running completion for a retried message, or a new one from `resume` (which replays or
        regenerates it) once none runs here; one that was abandoned is waited for first, so that its
        partial reply is stored by the time `resume` looks."""
        while (running := self._running.get(message_id)) is not None and running.abandoned:
            # Its last caller left and it is storing the partial reply: wait for that reply.
            await running.finished()
            self._forget(message_id, running)  # now, rather than when its done-callback runs
        if running is not None:
            return running
        return self.run(message_id, resume)
