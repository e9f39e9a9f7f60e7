"""The events of a completion stream, as the servicers turn them into protobuf: `Started`, `Delta`s, then
exactly one terminal event (`Finished`, or `Failed` followed by its error raised)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from chat_service.domain import Chat, FinishReason, Message
from chat_service.metrics import ChatMetrics
from chatmesh.common.errors import ChatmeshError


@dataclass(frozen=True, slots=True)
class Started:
    """First event: the stored user message (and, for CreateChat, the new chat)."""

    chat_id: uuid.UUID
    user_message_id: uuid.UUID | None
    chat: Chat | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """More reply text."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """Last event: the stored assistant message (None for a stateless completion, which stores nothing)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    assistant_message_id: uuid.UUID | None
    cached: bool = False
    cached_tokens: int = 0
    """Of a cached answer: its tokens (charged to no budget)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """Last event of a stream that broke after it started; the error itself is raised right after."""

    error: ChatmeshError


CompletionEvent = Started | Delta | Finished | Failed


def is_terminal(event: CompletionEvent) -> bool:
    return isinstance(event, Finished | Failed)


def stored_reply_events(
    chat_id: uuid.UUID, user_message_id: uuid.UUID, reply: Message
) -> tuple[CompletionEvent, ...]:
    """A reply already stored, as the events of a completion: a retry's or a watcher's replay."""
    text = (Delta(reply.content),) if reply.content else ()
    finished = Finished(
        reply.finish_reason or FinishReason.STOP, reply.prompt_tokens or 0, reply.token_count, reply.id
    )
    return (Started(chat_id, user_message_id), *text, finished)


async def with_outcome_metric(
    events: AsyncGenerator[CompletionEvent, None], metrics: ChatMetrics, model: str
) -> AsyncGenerator[CompletionEvent, None]:
    """`events` of one completion by `model`, counted in `metrics` by how it ended once it has."""
    outcome, cached = "cancelled", False
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Finished):
                    outcome, cached = event.finish_reason.value, event.cached
                elif isinstance(event, Failed):
                    outcome = "failed"
                yield event
    except Exception:
        outcome = "failed"
        raise
    finally:
        metrics.completion_ended(outcome, cached, model)
