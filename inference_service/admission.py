"""Admission control: a bounded number of running generations and a bounded wait queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from chatmesh.common.errors import ResourceExhausted


class AdmissionController:
    """Lets at most `max_active` holders in at once and `max_queued` more wait; rejects the rest.

    Rejection carries a retry hint estimated from how long recent slots were held, so clients back off
    for about as long as the queue takes to move instead of hammering a full server.
    """

    def __init__(
        self,
        max_active: int,
        max_queued: int,
        queue_timeout_s: float,
        on_reject: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """`on_reject(reason)` is told of every rejection: `full` (no slot, full queue) or
        `queue_timeout` (waited `queue_timeout_s` without a slot)."""
        self._on_reject = on_reject
        self._slots = asyncio.Semaphore(max_active)
        self._max_active = max_active
        self._max_queued = max_queued
        self._queue_timeout_s = queue_timeout_s
        self._waiting = 0
        self._active = 0
        self._avg_hold_s = 1.0

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    def retry_after_s(self) -> float:
        # Everyone ahead (running and waiting) must finish on max_active lanes before a new slot opens.
        ahead = self._active + self._waiting
        return max(0.1, self._avg_hold_s * ahead / self._max_active)

    def check(self) -> None:
        """Raise what `slot` would raise right now for a full house: lets a request be refused before
        any work is spent on it (a refusal must be fast, and preparing a prompt is not free)."""
        if self._slots.locked() and self._waiting >= self._max_queued:
            self._on_reject("full")
            raise ResourceExhausted(
                f"all {self._max_active} generation slots are busy and {self._waiting} requests are"
                " queued; retry later",
                self.retry_after_s(),
            )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the duration of the block, waiting in the queue if allowed."""
        if self._slots.locked():
            self.check()
            self._waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self._queue_timeout_s)
            except TimeoutError:
                self._on_reject("queue_timeout")
                raise ResourceExhausted(
                    f"waited {self._queue_timeout_s:.0f}s in the queue without getting a slot; retry later",
                    self.retry_after_s(),
                ) from None
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()
        self._active += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self._active -= 1
            self._slots.release()
            self._avg_hold_s = 0.8 * self._avg_hold_s + 0.2 * (time.monotonic() - started)
