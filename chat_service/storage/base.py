"""The conversation store interface. Every method is scoped by `user_id`: a chat of another user is
indistinguishable from a chat that does not exist (`NotFound`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from chat_service.accounting.values import UsageEntry
from chat_service.domain import (
    Chat,
    ChatCursor,
    ChatUpdate,
    FinishReason,
    HistoryStrategy,
    Job,
    JobRequest,
    JobState,
    Message,
)

NOT_COUNTED = 0
"""`token_count` of a user message whose tokens were not counted yet. `start_turn` stores the message
before its count is known (counting is a call to another service, which no transaction may wait on);
the count is recorded with the reply (`add_assistant_message(question_tokens=...)`) or, when no reply
comes, by `record_token_count`. A real count is never 0: the chat template alone adds tokens."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A replica's claim on generating one reply: `holder` until `seconds` from now, unless renewed."""

    holder: str
    seconds: float


class LimitReached(Exception):
    """A per-user limit refused one more: `active` is what the user holds already (the limit), and
    `oldest_started` when the oldest of those began (None if unknown). Not a domain error: the use case
    that set the limit raises the `ResourceExhausted` that names it."""

    def __init__(self, active: int, oldest_started: datetime | None) -> None:
        super().__init__(f"{active} active")
        self.active = active
        self.oldest_started = oldest_started


@dataclass(frozen=True, slots=True)
class TurnStart:
    """The start of a completion: the chat, its stored user message, whether this call stored it, and
    (when it did) the chat's history through that message, oldest first."""

    chat: Chat
    message: Message
    created: bool
    history: Sequence[Message]


@dataclass(frozen=True, slots=True)
class ReplyClaim:
    """What `claim_reply` found: the stored reply if there is one; else whether the caller holds the lease
    on generating it now (False: another holder's lease still runs)."""

    reply: Message | None
    claimed: bool


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """A stored user message, its chat, and the chat's history through that message, oldest first."""

    chat: Chat
    message: Message
    history: Sequence[Message]


class ConversationStore(Protocol):
    """Durable chats and messages."""

    async def create_chat(
        self,
        user_id: str,
        title: str,
        system_prompt: str,
        history_strategy: HistoryStrategy,
        request_id: str | None = None,
        *,
        model: str = "",
    ) -> tuple[Chat, bool]:
        """Create and commit a chat answered by `model` ("": the deployment's default). Idempotent on
        (user, request_id): a retry returns the chat created by the first call and False."""
        ...

    async def get_chat(self, user_id: str, chat_id: uuid.UUID) -> Chat:
        """The chat, or `NotFound` if it does not exist or is not the user's."""
        ...

    async def list_chats(self, user_id: str, limit: int, after: ChatCursor | None) -> Sequence[Chat]:
        """Up to `limit` of the user's chats, most recent activity first, strictly after `after`."""
        ...

    async def update_chat(self, user_id: str, chat_id: uuid.UUID, update: ChatUpdate) -> Chat:
        """Apply `update` and commit; `NotFound` as for get_chat."""
        ...

    async def delete_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        """Delete the chat and all its messages in one transaction; `NotFound` as for get_chat."""
        ...

    async def add_user_message(
        self, user_id: str, chat_id: uuid.UUID, content: str, token_count: int, request_id: str | None
    ) -> tuple[Message, bool]:
        """Commit a user message and bump the chat's activity time; set the chat's title from the
        content if the title is empty. Idempotent on (chat, request_id): if a message with that
        request id exists, return it and False instead of storing a second copy. `NotFound` as above.
        """
        ...

    async def start_turn(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        content: str,
        request_id: str | None,
        *,
        with_history: bool = True,
        lease: Lease | None = None,
    ) -> TurnStart:
        """`add_user_message` plus what a completion needs next (the chat, and its history through the new
        message) in one short transaction. The message is stored with `token_count` `NOT_COUNTED`, so
        the caller can count it concurrently and record the count later, and with `lease` (the caller
        generates its reply). On a retry (`created` False) the history is empty and the message is the
        stored one (counted or not)."""
        ...

    async def claim_completion(self, user_id: str, message_id: uuid.UUID, lease: Lease) -> bool:
        """Take or renew the lease on generating the reply to the user's message: True if `lease.holder`
        holds it now (nobody held it, it lapsed, or the holder already held it), False if another holder's
        lease is still running. `NotFound` if the user has no such message."""
        ...

    async def release_completion(self, message_id: uuid.UUID, holder: str) -> None:
        """Give up `holder`'s lease (the completion ended without a reply), so a retry anywhere may start
        at once; a lease someone else holds is left alone."""
        ...

    async def claim_reply(self, user_id: str, message_id: uuid.UUID, lease: Lease) -> ReplyClaim:
        """`find_reply`, and when there is no reply yet, `claim_completion`, in one transaction: what a
        retry or a job's worker asks before it generates a reply, and again while it waits for another
        replica's. `NotFound` as for `claim_completion`."""
        ...

    async def end_turn_unanswered(
        self, user_id: str, message_id: uuid.UUID, holder: str, token_count: int | None
    ) -> None:
        """A turn that ended without a reply: `record_token_count` (when `token_count` is given) and
        `release_completion` for `holder`, in one statement. A message that is gone is left gone."""
        ...

    async def take_generation_slot(self, user_id: str, slot_id: uuid.UUID, lease: Lease, limit: int) -> bool:
        """Record that `lease.holder` starts a completion stream for the user (slot `slot_id`, held until
        `lease.seconds` from now unless renewed), unless the user holds `limit` live slots already, in
        any replica: then `LimitReached` and nothing is recorded. Counting and taking are one step: two
        replicas racing for the user's last slot cannot both get it. False (and nothing recorded) if the
        user holds `slot_id` already: a retry of the same request shares its slot."""
        ...

    async def renew_generation_slot(self, slot_id: uuid.UUID, lease: Lease) -> None:
        """Extend the slot's lease to `lease.seconds` from now."""
        ...

    async def release_generation_slot(self, slot_id: uuid.UUID) -> None:
        """Free the slot (its stream ended)."""
        ...

    async def add_assistant_message(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        reply_to: uuid.UUID,
        content: str,
        token_count: int,
        finish_reason: FinishReason,
        prompt_tokens: int | None = None,
        question_tokens: int | None = None,
        *,
        model: str | None = None,
        usage: UsageEntry | None = None,
    ) -> tuple[Message, bool]:
        """Commit the reply to user message `reply_to`, written by `model`, and bump the chat's activity
        time; with `question_tokens`, record that as the token count of `reply_to` in the same
        transaction; with `usage`, record it (its `message_id` and `chat_id` set to the new reply's) and
        add it to the running totals, in the same transaction too (see `AccountStore.record_usage`).
        Idempotent on `reply_to`: at most one reply per user message; a second call returns the existing
        reply and False (and records nothing, `usage` included). `NotFound` as above, or if `reply_to`
        is not a user message of this chat."""
        ...

    async def record_token_count(self, user_id: str, message_id: uuid.UUID, token_count: int) -> None:
        """Record the token count of the user's message `message_id` (for a turn that ended without a
        reply); `NotFound` if the user has no such message."""
        ...

    async def find_reply(self, user_id: str, user_message_id: uuid.UUID) -> Message | None:
        """The assistant reply to the user's message `user_message_id`, if one is stored (None also for
        another user's message)."""
        ...

    async def chat_of_message(self, user_id: str, message_id: uuid.UUID) -> uuid.UUID:
        """The chat of the user's message `message_id`; `NotFound` if the user has no such message."""
        ...

    async def stored_turn(self, user_id: str, message_id: uuid.UUID) -> StoredTurn:
        """The user's stored message `message_id`, its chat and the chat's history through it, read
        together (what answering a stored question needs); `NotFound` if the user has no such message."""
        ...

    async def history(
        self, user_id: str, chat_id: uuid.UUID, after_seq: int | None = None
    ) -> Sequence[Message]:
        """All messages of the chat oldest first (only those with seq > after_seq if given); `NotFound`
        as above."""
        ...

    async def messages_page(
        self, user_id: str, chat_id: uuid.UUID, limit: int, after_seq: int | None
    ) -> Sequence[Message]:
        """Up to `limit` messages oldest first, strictly after `after_seq`; `NotFound` as above."""
        ...

    async def latest_summary(self, user_id: str, chat_id: uuid.UUID) -> Message | None:
        """The newest message of the chat that carries a summary, if any; `NotFound` as above."""
        ...

    async def save_summary(self, user_id: str, message_id: uuid.UUID, summary: str) -> None:
        """Store `summary` (of the history through `message_id`) on that message; `NotFound` if the
        user has no such message."""
        ...


class JobStore(Protocol):
    """Durable asynchronous completions (the queue holds only their ids)."""

    async def create_job(self, request: JobRequest, max_active: int = 0) -> tuple[Job, bool]:
        """Commit a queued job for `request.user_message_id`. Idempotent on that message: a retry returns
        the job created first and False. `NotFound` if the user has no such message. With `max_active`
        (0: no limit), `LimitReached` when the user has that many jobs queued or running already (a
        retry of one of them is not refused); counting and creating are one step across replicas."""
        ...

    async def discard_question(self, user_id: str, message_id: uuid.UUID) -> None:
        """Delete the user's message if nothing answers it yet (no reply, no job): a submission that was
        refused leaves nothing behind."""
        ...

    async def get_job(self, user_id: str, job_id: uuid.UUID) -> Job:
        """The user's job; `NotFound` if it does not exist or is another user's."""
        ...

    async def load_job(self, job_id: uuid.UUID) -> Job | None:
        """Any user's job, for the worker (None when it was deleted with its chat)."""
        ...

    async def update_job(
        self, job_id: uuid.UUID, state: JobState, attempts: int, error: str | None = None
    ) -> None:
        """Record a job's progress (a job deleted meanwhile is left deleted)."""
        ...

    async def mark_job_published(self, job_id: uuid.UUID) -> None:
        """Record that the queue took the job's id (once; later calls change nothing)."""
        ...

    async def unpublished_jobs(self, created_before: datetime, limit: int) -> Sequence[Job]:
        """Up to `limit` queued jobs, oldest first, created before `created_before`, that the queue
        never took (their replica stopped between storing and queueing them) and no worker has seen."""
        ...

    async def discard_job(self, job: Job) -> None:
        """Delete a job that could not be queued, and its user message while it has no reply, so the
        refused submission leaves nothing behind."""
        ...
