"""Per-user limits on what one user may hold at once, so that one user cannot take the machine from the
others: completion streams running (the engine has a fixed number of slots) and jobs unfinished (the queue
has a fixed capacity). Both are counted in the shared database, so they hold however many chat replicas
serve the user, and a refusal is a RESOURCE_EXHAUSTED (HTTP 429) naming the limit, with a retry hint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from chat_service.storage.base import ConversationStore, Lease, LimitReached
from chatmesh.common.errors import ChatmeshError, ResourceExhausted

log = logging.getLogger(__name__)

COMPLETIONS_SETTING = "CHATMESH_CHAT_MAX_CONCURRENT_COMPLETIONS_PER_USER"
JOBS_SETTING = "CHATMESH_CHAT_MAX_ACTIVE_JOBS_PER_USER"

_SLOT_NAMESPACE = uuid.UUID("5b0f6f4e-8d1c-4f7a-9c55-3a3c1e0c7a10")
"""Namespace of the slot ids derived from a request's key (uuid5), so a retry finds its first attempt's."""

MIN_RETRY_AFTER_S = 0.5
"""The shortest retry hint: a completion past its expected length may end any moment, but a client that
came back at once would only be refused again."""

MAX_RETRY_AFTER_S = 60.0
"""The longest retry hint: beyond it the estimate says little, and a client should look again."""


class CompletionDurations:
    """How long completions held their slot here lately, the basis of the retry hint (when one of the
    user's running completions is expected to end): an exponentially weighted mean per user (the users
    seen most recently, up to `max_users`), and one over everyone's for a user not seen yet. Per user,
    because one user's long completions say little about another's short ones: a user who floods with
    long ones is told to come back when one of theirs is due, not every half second."""

    def __init__(self, initial_s: float = 5.0, weight: float = 0.2, max_users: int = 10_000) -> None:
        self._mean_s = initial_s
        self._weight = weight
        self._by_user: OrderedDict[str, float] = OrderedDict()
        self._max_users = max_users

    def mean_s(self, user_id: str | None = None) -> float:
        """The estimate of a completion's duration, in seconds: the user's if known, else everyone's."""
        if user_id is not None and (mean := self._by_user.get(user_id)) is not None:
            return mean
        return self._mean_s

    def add(self, user_id: str, seconds: float) -> None:
        """Fold one of the user's completion's duration into the estimates."""
        self._mean_s += self._weight * (seconds - self._mean_s)
        mean = self._by_user.pop(user_id, None)
        self._by_user[user_id] = seconds if mean is None else mean + self._weight * (seconds - mean)
        if len(self._by_user) > self._max_users:
            self._by_user.popitem(last=False)

    def retry_after_s(self, user_id: str, oldest_started: datetime | None, active: int = 1) -> float:
        """Seconds until one of the user's `active` running completions (the oldest started at
        `oldest_started`) is expected to end, within [MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S]: not before
        the oldest is due, and once it is overdue, at the rate the user's completions end (one every
        mean / `active` seconds), so that a user with many requests waiting does not retry them all
        every half second."""
        mean_s = self.mean_s(user_id)
        age_s = (datetime.now(UTC) - oldest_started).total_seconds() if oldest_started else 0.0
        expected_s = max(mean_s - age_s, mean_s / max(1, active))
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, expected_s))


class HeldSlot:
    """One of a user's slots, held by a completion stream: `release` gives it back (once; later calls do
    nothing), as soon as the stream's last event is known, so that a client that reads that event and
    asks again at once finds the slot free."""

    def __init__(self, release: Callable[[], Awaitable[None]] | None = None) -> None:
        self._release = release

    async def release(self) -> None:
        """Give the slot back (no-op if it was, or if the stream shares another's slot)."""
        release, self._release = self._release, None
        if release is not None:
            await release()


class CompletionLimit:
    """At most `per_user` completion streams per user at once, across every replica on the database
    (0: no limit). A stream holds a slot in the store while it runs: a row leased to this replica and
    renewed every third of `lease.seconds`, deleted when the stream ends, and no longer counted once its
    lease lapses if this replica dies."""

    def __init__(self, store: ConversationStore, lease: Lease, per_user: int) -> None:
        self._store = store
        self._lease = lease
        self.per_user = per_user
        self.durations = CompletionDurations()

    @contextlib.asynccontextmanager
    async def slot(self, user_id: str, request_key: str | None = None) -> AsyncIterator[HeldSlot]:
        """Hold one of the user's slots for the block (or until its `release`); `ResourceExhausted` if
        they hold them all.

        `request_key` names the request (its client request id, with what it is scoped to): a retry with
        the same key while the first attempt still streams, on any replica, shares that attempt's slot,
        as it shares its completion."""
        if not self.per_user:
            yield HeldSlot()
            return
        slot_id = (
            uuid.uuid5(_SLOT_NAMESPACE, f"{user_id}\n{request_key}")
            if request_key is not None
            else uuid.uuid4()
        )
        try:
            owned = await self._store.take_generation_slot(user_id, slot_id, self._lease, self.per_user)
        except LimitReached as reached:
            retry_after_s = self.durations.retry_after_s(user_id, reached.oldest_started, reached.active)
            raise ResourceExhausted(
                f"too many completions at once: you have {reached.active} running and the limit is"
                f" {self.per_user} per user ({COMPLETIONS_SETTING}); retry in {retry_after_s:.1f} s,"
                " when one of them is expected to have ended",
                retry_after_s,
            ) from None
        if not owned:
            yield HeldSlot()  # the first attempt holds the slot, renews it and gives it back
            return
        started = time.monotonic()
        renewing = asyncio.create_task(self._renew(slot_id))

        async def give_back() -> None:
            renewing.cancel()
            self.durations.add(user_id, time.monotonic() - started)
            # Shielded: a stream cancelled because its client left still gives its slot back now (and
            # were this replica to stop first, the lease would lapse).
            await asyncio.shield(self._release(slot_id))

        held = HeldSlot(give_back)
        try:
            yield held
        finally:
            await held.release()

    async def _renew(self, slot_id: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(self._lease.seconds / 3)
            try:
                await self._store.renew_generation_slot(slot_id, self._lease)
            except ChatmeshError as exc:
                log.warning("renewing a completion slot failed", extra={"error": exc.message})

    async def _release(self, slot_id: uuid.UUID) -> None:
        try:
            await self._store.release_generation_slot(slot_id)
        except ChatmeshError as exc:
            # The lease lapses on its own: the user gets the slot back a little later.
            log.warning("releasing a completion slot failed", extra={"error": exc.message})


def too_many_jobs(
    user_id: str, reached: LimitReached, per_user: int, durations: CompletionDurations
) -> ResourceExhausted:
    """The refusal of a job beyond the user's limit; retry when the oldest of theirs may have ended."""
    retry_after_s = durations.retry_after_s(user_id, reached.oldest_started, reached.active)
    return ResourceExhausted(
        f"too many jobs: you have {reached.active} queued or running and the limit is {per_user} per user"
        f" ({JOBS_SETTING}); retry in {retry_after_s:.1f} s, when one of them may have finished",
        retry_after_s,
    )
