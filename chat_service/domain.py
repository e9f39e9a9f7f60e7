"""Domain values of the chat service, independent of protobuf and of the database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class HistoryStrategy(StrEnum):
    """How a chat's history becomes the prompt."""

    FULL = "full"
    WINDOW = "window"
    SUMMARY = "summary"


class Role(StrEnum):
    """Author of a stored message (the system prompt lives on the chat)."""

    USER = "user"
    ASSISTANT = "assistant"


class FinishReason(StrEnum):
    """Why an assistant message ended."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Chat:
    """A conversation owned by one user."""

    id: uuid.UUID
    user_id: str
    title: str
    system_prompt: str
    history_strategy: HistoryStrategy
    created_at: datetime
    last_activity_at: datetime
    model: str
    """The model that answers the chat's next turn ("": the deployment's default, for chats made before
    chats had models); see `ServedModels.of_chat`."""


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message. `seq` orders messages (globally increasing, so also within a chat).

    `summary`, when set, summarises the chat's history up to and including this message; the newest
    such message is where the summary strategy resumes.
    """

    id: uuid.UUID
    chat_id: uuid.UUID
    user_id: str
    seq: int
    role: Role
    content: str
    token_count: int
    finish_reason: FinishReason | None
    request_id: str | None
    reply_to: uuid.UUID | None
    created_at: datetime
    summary: str | None = None
    prompt_tokens: int | None = None
    """For assistant messages: the prompt tokens the reply was generated from (usage on replay)."""
    model: str | None = None
    """For assistant messages: the model that wrote the reply (None for user messages, and for replies
    stored before replies recorded it)."""


@dataclass(frozen=True, slots=True)
class ChatCursor:
    """Position in a user's chat list (most recent activity first)."""

    last_activity_at: datetime
    chat_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ChatUpdate:
    """Fields of a chat to change; None leaves a field as it is."""

    title: str | None = None
    system_prompt: str | None = None
    history_strategy: HistoryStrategy | None = None
    model: str | None = None
    """A served model's name (the use case resolves and checks it before the store sees it)."""


class JobState(StrEnum):
    """Where an asynchronous completion is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """No worker will touch the job again."""
        return self in (JobState.SUCCEEDED, JobState.FAILED)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What a job was asked to do: answer `user_message_id` with these sampling settings."""

    user_id: str
    chat_id: uuid.UUID
    user_message_id: uuid.UUID
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    use_cache: bool


@dataclass(frozen=True, slots=True)
class Job:
    """An asynchronous completion and its progress; its answer is the reply to `request.user_message_id`."""

    id: uuid.UUID
    request: JobRequest
    state: JobState
    attempts: int
    """Deliveries to a worker so far."""
    error: str | None
    """Why the job failed (or why its last attempt failed, while it is queued for another)."""
    created_at: datetime
    updated_at: datetime
