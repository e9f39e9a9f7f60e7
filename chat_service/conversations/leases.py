"""Cross-replica completion leases: the replica that generates a reply holds a lease on its user message in
the store, renewed while it runs, so a retry (or a job's redelivery) that lands on another replica waits
for that reply rather than generating a second one, and takes over once the lease lapses (its replica
died)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from chat_service.domain import Message
from chat_service.storage.base import ConversationStore, Lease
from chatmesh.common.errors import ChatmeshError

log = logging.getLogger(__name__)


class CompletionLeases:
    """This replica's leases on generating replies: `lease` names it (`lease.holder`) and says how long
    a lease runs unless renewed (`lease.seconds`)."""

    def __init__(self, store: ConversationStore, lease: Lease, poll_interval_s: float = 0.2) -> None:
        self._store = store
        self.lease = lease
        self._poll_interval_s = poll_interval_s

    async def reply_or_take(
        self,
        user_id: str,
        message_id: uuid.UUID,
        *,
        poll_interval_s: float | None = None,
        waiting: str | None = None,
    ) -> Message | None:
        """The stored reply to the user's message, if there is one; else None once this replica holds the
        lease (the caller generates the reply now). While another replica's lease runs, wait for its reply
        or for its lease to lapse, looking every `poll_interval_s` (the store is all replicas share);
        `waiting`, if given, is logged once when that happens."""
        while True:
            claim = await self._store.claim_reply(user_id, message_id, self.lease)
            if claim.reply is not None:
                return claim.reply
            if claim.claimed:
                return None
            if waiting is not None:
                log.info(waiting, extra={"message_id": str(message_id)})
                waiting = None
            await asyncio.sleep(self._poll_interval_s if poll_interval_s is None else poll_interval_s)

    async def keep(self, user_id: str, message_id: uuid.UUID) -> None:
        """Renew this replica's lease on the completion while it runs (cancelled when it ends)."""
        while True:
            await asyncio.sleep(self.lease.seconds / 3)
            try:
                if not await self._store.claim_completion(user_id, message_id, self.lease):
                    log.warning(
                        "another replica took over a running completion",
                        extra={"message_id": str(message_id)},
                    )
            except ChatmeshError as exc:
                log.warning("renewing a completion lease failed", extra={"error": exc.message})

    async def release(self, message_id: uuid.UUID) -> None:
        """Free the completion for a retry anywhere (it ended without a reply); a failure is logged (the
        lease then lapses on its own)."""
        try:
            await self._store.release_completion(message_id, self.lease.holder)
        except ChatmeshError as exc:
            log.warning("releasing a completion lease failed", extra={"error": exc.message})

    async def end_unanswered(self, question: Message, token_count: int | None) -> None:
        """A turn that ends without a reply: record the question's token count (if known) and free the
        completion for a retry anywhere, in one write. A failure is logged, not raised: the turn's own
        failure is what the caller must hear about; a missing count only makes the window strategy ask
        the engine once more, and the lease lapses on its own."""
        try:
            await self._store.end_turn_unanswered(
                question.user_id, question.id, self.lease.holder, token_count
            )
        except Exception:
            log.warning("recording the end of an unanswered turn failed", exc_info=True)
