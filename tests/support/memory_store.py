"""In-memory `ConversationStore` and `JobStore` (the contracts of chat_service/storage/base.py) in dicts,
with the SQL stores' idempotency, leases and per-user slots, for unit tests (see tests/support/fakes.py).
Several stores (replicas) may share one `MemoryDatabase`. Every write is noted in its `log`, so a test can
assert the order of writes and events."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

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
    Role,
)
from chat_service.storage.base import (
    NOT_COUNTED,
    ConversationStore,
    JobStore,
    Lease,
    LimitReached,
    ReplyClaim,
    StoredTurn,
    TurnStart,
)
from chatmesh.common.errors import NotFound


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Slot:
    user_id: str
    acquired_at: datetime
    lease_until: datetime


@dataclass
class MemoryDatabase:
    """What the in-memory stores share: one per "deployment", however many replicas use it."""

    chats: dict[uuid.UUID, Chat] = field(default_factory=dict)
    chat_request_ids: dict[tuple[str, str], uuid.UUID] = field(default_factory=dict)
    messages: dict[uuid.UUID, Message] = field(default_factory=dict)
    leases: dict[uuid.UUID, tuple[str, datetime]] = field(default_factory=dict)
    slots: dict[uuid.UUID, _Slot] = field(default_factory=dict)
    jobs: dict[uuid.UUID, Job] = field(default_factory=dict)
    published: set[uuid.UUID] = field(default_factory=set)
    log: list[str] = field(default_factory=list)
    """Every write, in order: "chat <title>", "question <content>", "reply <content> (<reason>)", ..."""
    refused_leases: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    """(message id, holder) of every lease taken while another holder's ran (a replica waiting)."""
    usage: list[UsageEntry] = field(default_factory=list)
    """The usage recorded with replies (`add_assistant_message(usage=...)`), with their reply's ids set."""
    _seq: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def note(self, entry: str) -> None:
        """Record a write and wake whoever waits for one."""
        self.log.append(entry)
        self.wake()

    def wake(self) -> None:
        """Wake whoever waits for a change (`wait_until`)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds; it is checked again after every write (no timer)."""
        while not condition():
            await self._changed.wait()

    def reply_to(self, message_id: uuid.UUID) -> Message | None:
        return next((m for m in self.messages.values() if m.reply_to == message_id), None)

    def chat_messages(self, chat_id: uuid.UUID) -> list[Message]:
        return sorted((m for m in self.messages.values() if m.chat_id == chat_id), key=lambda m: m.seq)


def _title(content: str) -> str:
    line = next((line for line in content.splitlines() if line.strip()), "")
    return " ".join(line.split())[:80]


class MemoryConversationStore(ConversationStore):
    """`ConversationStore` over a `MemoryDatabase`. No write awaits anything, so each is atomic, as the SQL
    stores' transactions are."""

    def __init__(self, database: MemoryDatabase | None = None) -> None:
        self.db = database if database is not None else MemoryDatabase()

    def _chat(self, user_id: str, chat_id: uuid.UUID) -> Chat:
        chat = self.db.chats.get(chat_id)
        if chat is None or chat.user_id != user_id:
            raise NotFound(f"chat {chat_id} not found")
        return chat

    def _message(self, user_id: str, message_id: uuid.UUID) -> Message:
        message = self.db.messages.get(message_id)
        if message is None or message.user_id != user_id:
            raise NotFound(f"message {message_id} not found")
        return message

    def _bump(self, chat: Chat, title: str | None) -> Chat:
        bumped = dataclasses.replace(chat, last_activity_at=_now(), title=chat.title or (title or ""))
        self.db.chats[chat.id] = bumped
        return bumped

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
        if request_id is not None and (user_id, request_id) in self.db.chat_request_ids:
            return self.db.chats[self.db.chat_request_ids[(user_id, request_id)]], False
        now = _now()
        chat = Chat(uuid.uuid4(), user_id, title, system_prompt, history_strategy, now, now, model)
        self.db.chats[chat.id] = chat
        if request_id is not None:
            self.db.chat_request_ids[(user_id, request_id)] = chat.id
        self.db.note(f"chat {title}")
        return chat, True

    async def get_chat(self, user_id: str, chat_id: uuid.UUID) -> Chat:
        return self._chat(user_id, chat_id)

    async def list_chats(self, user_id: str, limit: int, after: ChatCursor | None) -> Sequence[Chat]:
        chats = sorted(
            (c for c in self.db.chats.values() if c.user_id == user_id),
            key=lambda c: (c.last_activity_at, c.id),
            reverse=True,
        )
        if after is not None:
            chats = [c for c in chats if (c.last_activity_at, c.id) < (after.last_activity_at, after.chat_id)]
        return chats[: max(limit, 0)]

    async def update_chat(self, user_id: str, chat_id: uuid.UUID, update: ChatUpdate) -> Chat:
        chat = self._chat(user_id, chat_id)
        changes = {k: v for k, v in dataclasses.asdict(update).items() if v is not None}
        updated = dataclasses.replace(chat, **changes)
        self.db.chats[chat_id] = updated
        return updated

    async def delete_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        self._chat(user_id, chat_id)
        del self.db.chats[chat_id]
        for message in self.db.chat_messages(chat_id):
            del self.db.messages[message.id]
        for job in [j for j in self.db.jobs.values() if j.request.chat_id == chat_id]:
            del self.db.jobs[job.id]
        self.db.note(f"delete {chat_id}")

    async def add_user_message(
        self, user_id: str, chat_id: uuid.UUID, content: str, token_count: int, request_id: str | None
    ) -> tuple[Message, bool]:
        turn = self._insert_question(user_id, chat_id, content, token_count, request_id, None)
        return turn.message, turn.created

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
        turn = self._insert_question(user_id, chat_id, content, NOT_COUNTED, request_id, lease)
        return turn if with_history else dataclasses.replace(turn, history=[])

    def _insert_question(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        content: str,
        token_count: int,
        request_id: str | None,
        lease: Lease | None,
    ) -> TurnStart:
        chat = self._chat(user_id, chat_id)
        if request_id is not None:
            for stored in self.db.chat_messages(chat_id):
                if stored.request_id == request_id:
                    return TurnStart(chat, stored, False, [])
        chat = self._bump(chat, _title(content))
        message = Message(
            uuid.uuid4(),
            chat_id,
            user_id,
            self.db.next_seq(),
            Role.USER,
            content,
            token_count,
            None,
            request_id,
            None,
            _now(),
        )
        history = [*self.db.chat_messages(chat_id), message]
        self.db.messages[message.id] = message
        if lease is not None:
            self.db.leases[message.id] = (lease.holder, _now() + timedelta(seconds=lease.seconds))
        self.db.note(f"question {content}")
        return TurnStart(chat, message, True, history)

    async def claim_completion(self, user_id: str, message_id: uuid.UUID, lease: Lease) -> bool:
        message = self._message(user_id, message_id)
        if message.role is not Role.USER:
            return False
        held = self.db.leases.get(message_id)
        if held is not None and held[0] != lease.holder and held[1] >= _now():
            self.db.refused_leases.append((message_id, lease.holder))
            self.db.wake()
            return False
        self.db.leases[message_id] = (lease.holder, _now() + timedelta(seconds=lease.seconds))
        return True

    async def release_completion(self, message_id: uuid.UUID, holder: str) -> None:
        held = self.db.leases.get(message_id)
        if held is not None and held[0] == holder:
            del self.db.leases[message_id]

    async def claim_reply(self, user_id: str, message_id: uuid.UUID, lease: Lease) -> ReplyClaim:
        if (reply := await self.find_reply(user_id, message_id)) is not None:
            return ReplyClaim(reply, False)
        return ReplyClaim(None, await self.claim_completion(user_id, message_id, lease))

    async def end_turn_unanswered(
        self, user_id: str, message_id: uuid.UUID, holder: str, token_count: int | None
    ) -> None:
        message = self.db.messages.get(message_id)
        if message is None or message.user_id != user_id:
            return
        if token_count is not None:
            self.db.messages[message_id] = dataclasses.replace(message, token_count=token_count)
        await self.release_completion(message_id, holder)
        self.db.note(f"unanswered {message.content} {token_count}")

    async def take_generation_slot(self, user_id: str, slot_id: uuid.UUID, lease: Lease, limit: int) -> bool:
        now = _now()
        for lapsed in [k for k, s in self.db.slots.items() if s.user_id == user_id and s.lease_until < now]:
            del self.db.slots[lapsed]
        if slot_id in self.db.slots:
            return False
        others = [s for s in self.db.slots.values() if s.user_id == user_id]
        if len(others) >= limit:
            raise LimitReached(len(others), min(s.acquired_at for s in others))
        self.db.slots[slot_id] = _Slot(user_id, now, now + timedelta(seconds=lease.seconds))
        return True

    async def renew_generation_slot(self, slot_id: uuid.UUID, lease: Lease) -> None:
        if (slot := self.db.slots.get(slot_id)) is not None:
            slot.lease_until = _now() + timedelta(seconds=lease.seconds)

    async def release_generation_slot(self, slot_id: uuid.UUID) -> None:
        self.db.slots.pop(slot_id, None)

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
        chat = self._chat(user_id, chat_id)
        question = self.db.messages.get(reply_to)
        if question is None or question.chat_id != chat_id or question.role is not Role.USER:
            raise NotFound(f"message {reply_to} not found")
        if (existing := self.db.reply_to(reply_to)) is not None:
            return existing, False
        self._bump(chat, None)
        if question_tokens is not None:
            self.db.messages[reply_to] = dataclasses.replace(question, token_count=question_tokens)
        reply = Message(
            uuid.uuid4(),
            chat_id,
            user_id,
            self.db.next_seq(),
            Role.ASSISTANT,
            content,
            token_count,
            finish_reason,
            None,
            reply_to,
            _now(),
            prompt_tokens=prompt_tokens,
            model=model,
        )
        self.db.messages[reply.id] = reply
        if usage is not None:
            self.db.usage.append(dataclasses.replace(usage, chat_id=chat_id, message_id=reply.id))
        self.db.note(f"reply {content} ({finish_reason.value})")
        return reply, True

    async def record_token_count(self, user_id: str, message_id: uuid.UUID, token_count: int) -> None:
        message = self._message(user_id, message_id)
        self.db.messages[message_id] = dataclasses.replace(message, token_count=token_count)
        self.db.note(f"count {message.content} {token_count}")

    async def find_reply(self, user_id: str, user_message_id: uuid.UUID) -> Message | None:
        reply = self.db.reply_to(user_message_id)
        return reply if reply is not None and reply.user_id == user_id else None

    async def chat_of_message(self, user_id: str, message_id: uuid.UUID) -> uuid.UUID:
        return self._message(user_id, message_id).chat_id

    async def stored_turn(self, user_id: str, message_id: uuid.UUID) -> StoredTurn:
        message = self._message(user_id, message_id)
        history = [m for m in self.db.chat_messages(message.chat_id) if m.seq <= message.seq]
        return StoredTurn(self._chat(user_id, message.chat_id), message, history)

    async def history(
        self, user_id: str, chat_id: uuid.UUID, after_seq: int | None = None
    ) -> Sequence[Message]:
        self._chat(user_id, chat_id)
        return [m for m in self.db.chat_messages(chat_id) if after_seq is None or m.seq > after_seq]

    async def messages_page(
        self, user_id: str, chat_id: uuid.UUID, limit: int, after_seq: int | None
    ) -> Sequence[Message]:
        return list(await self.history(user_id, chat_id, after_seq))[: max(limit, 0)]

    async def latest_summary(self, user_id: str, chat_id: uuid.UUID) -> Message | None:
        summarized = [m for m in await self.history(user_id, chat_id) if m.summary is not None]
        return summarized[-1] if summarized else None

    async def save_summary(self, user_id: str, message_id: uuid.UUID, summary: str) -> None:
        message = self._message(user_id, message_id)
        self.db.messages[message_id] = dataclasses.replace(message, summary=summary)


class MemoryJobStore(JobStore):
    """`JobStore` over a `MemoryDatabase` (the one its conversation store uses)."""

    def __init__(self, database: MemoryDatabase) -> None:
        self.db = database

    async def create_job(self, request: JobRequest, max_active: int = 0) -> tuple[Job, bool]:
        question = self.db.messages.get(request.user_message_id)
        if (
            question is None
            or question.user_id != request.user_id
            or question.chat_id != request.chat_id
            or question.role is not Role.USER
        ):
            raise NotFound(f"message {request.user_message_id} not found")
        for job in self.db.jobs.values():
            if job.request.user_message_id == request.user_message_id:
                return job, False
        if max_active:
            active = [
                j
                for j in self.db.jobs.values()
                if j.request.user_id == request.user_id and not j.state.finished
            ]
            if len(active) >= max_active:
                raise LimitReached(len(active), min(j.created_at for j in active))
        now = _now()
        job = Job(uuid.uuid4(), request, JobState.QUEUED, 0, None, now, now)
        self.db.jobs[job.id] = job
        self.db.note(f"job {request.user_message_id}")
        return job, True

    async def discard_question(self, user_id: str, message_id: uuid.UUID) -> None:
        message = self.db.messages.get(message_id)
        answered = self.db.reply_to(message_id) is not None
        has_job = any(j.request.user_message_id == message_id for j in self.db.jobs.values())
        if message is not None and message.user_id == user_id and not answered and not has_job:
            del self.db.messages[message_id]

    async def get_job(self, user_id: str, job_id: uuid.UUID) -> Job:
        job = self.db.jobs.get(job_id)
        if job is None or job.request.user_id != user_id:
            raise NotFound(f"job {job_id} not found")
        return job

    async def load_job(self, job_id: uuid.UUID) -> Job | None:
        return self.db.jobs.get(job_id)

    async def update_job(
        self, job_id: uuid.UUID, state: JobState, attempts: int, error: str | None = None
    ) -> None:
        if (job := self.db.jobs.get(job_id)) is not None:
            self.db.jobs[job_id] = dataclasses.replace(
                job, state=state, attempts=attempts, error=error, updated_at=_now()
            )
            self.db.published.add(job_id)

    async def mark_job_published(self, job_id: uuid.UUID) -> None:
        self.db.published.add(job_id)

    async def unpublished_jobs(self, created_before: datetime, limit: int) -> Sequence[Job]:
        waiting = [
            j
            for j in self.db.jobs.values()
            if j.id not in self.db.published
            and j.created_at < created_before
            and j.state is JobState.QUEUED
            and j.attempts == 0
        ]
        return sorted(waiting, key=lambda j: j.created_at)[:limit]

    async def discard_job(self, job: Job) -> None:
        self.db.jobs.pop(job.id, None)
        if self.db.reply_to(job.request.user_message_id) is None:
            self.db.messages.pop(job.request.user_message_id, None)
