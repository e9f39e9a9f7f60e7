"""The typed events of a completion stream (`Started`, `Delta`, `Finished`), the stream that yields them,
and what a retried stream needs to continue where the caller is instead of repeating text."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeAlias

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.common.errors import Unavailable

SERVICE = "chat service"
"""How error messages name the other side (`error_from_rpc`'s `service`)."""

FinishReason: TypeAlias = pb.FinishReason


@dataclass(frozen=True, slots=True)
class Started:
    """First event of a completion: the chat and the stored user message."""

    chat_id: str
    user_message_id: str
    """Empty when a chat was created without a first message (`AsyncChatClient.create_chat`)."""
    chat: pb.Chat | None
    """The new chat, when the completion started one."""
    raw: pb.CompletionEvent = field(repr=False)
    """The event as it came over the wire."""


@dataclass(frozen=True, slots=True)
class Delta:
    """Text to append to the reply received so far."""

    text: str
    raw: pb.CompletionEvent = field(repr=False)


@dataclass(frozen=True, slots=True)
class Finished:
    """Last event of a successful completion: why it ended, what it cost, where it is stored."""

    finish_reason: FinishReason
    """`pb.FINISH_REASON_STOP`, `_LENGTH` (max_tokens reached) or `_CANCELLED`."""
    usage: pb.Usage
    assistant_message_id: str
    cached: bool
    """True when the reply came from the semantic cache."""
    raw: pb.CompletionEvent = field(repr=False)


CompletionEvent: TypeAlias = Started | Delta | Finished
"""One event of a completion stream, in the order Started, Delta*, Finished."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """The `error` event: the stream failed after it started. Never yielded; it becomes an exception."""

    code: str
    message: str


def parse_event(raw: pb.CompletionEvent) -> Started | Delta | Finished | _Failed:
    """The typed form of one wire event (exactly one kind per event, see chat.proto)."""
    if raw.HasField("error"):
        return _Failed(raw.error.code, raw.error.message)
    if raw.chat_id:
        return Started(raw.chat_id, raw.user_message_id, raw.chat if raw.HasField("chat") else None, raw)
    if raw.assistant_message_id:
        return Finished(raw.finish_reason, raw.usage, raw.assistant_message_id, raw.cached, raw)
    if raw.delta:
        return Delta(raw.delta, raw)
    raise Unavailable(f"{SERVICE} sent a completion event of no known kind: {raw}")


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole completion, as `complete` collects it."""

    chat_id: str
    user_message_id: str
    text: str
    finish_reason: FinishReason
    usage: pb.Usage
    assistant_message_id: str
    cached: bool
    request_id: str
    """The id the completion was sent with; sending it again returns this same completion."""
    chat: pb.Chat | None = None
    """The new chat, when this completion started one."""


class CompletionStream:
    """The typed events of one completion: iterate it with `async for`.

    Use it as an async context manager (`async with client.stream(...) as events:`) when you may stop
    before the end: leaving the block cancels the completion at once (the service keeps the partial
    reply, marked `FINISH_REASON_CANCELLED`), where an abandoned iterator would only be cancelled when
    garbage-collected.
    """

    def __init__(self, events: AsyncGenerator[CompletionEvent, None], request_id: str) -> None:
        self._events = events
        self.request_id = request_id
        """The id the completion is sent with (and retried with)."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> CompletionEvent:
        return await anext(self._events)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading; a completion still running is cancelled."""
        await self._events.aclose()

    async def collect(self) -> Completion:
        """Read the stream to its end and return it as one `Completion`."""
        started: Started | None = None
        pieces: list[str] = []
        async with self:
            async for event in self:
                if isinstance(event, Started):
                    started = event
                elif isinstance(event, Delta):
                    pieces.append(event.text)
                else:
                    assert started is not None  # the client yields Started first
                    return Completion(
                        chat_id=started.chat_id,
                        user_message_id=started.user_message_id,
                        text="".join(pieces),
                        finish_reason=event.finish_reason,
                        usage=event.usage,
                        assistant_message_id=event.assistant_message_id,
                        cached=event.cached,
                        request_id=self.request_id,
                        chat=started.chat,
                    )
        raise Unavailable(f"{SERVICE} ended the completion without a final event")


class CompletionDiverged(Unavailable):
    """A completion was retried after the text had started arriving, and the retry's reply does not
    continue what was already received (the first attempt died before its reply was stored and the
    reply was generated anew). The stored reply is the retried one; `received` is what was delivered
    before the retry."""

    def __init__(self, message: str, received: str) -> None:
        super().__init__(message)
        self.received = received


class Resumption:
    """What the caller of a completion stream already has, so that a retry, which replays the
    completion from its start, continues the stream instead of repeating it."""

    def __init__(self) -> None:
        self.started: Started | None = None
        self.received = ""  # reply text already given to the caller
        self.replayed = ""  # reply text of the current attempt

    def next_attempt(self) -> None:
        self.replayed = ""

    def admit(self, event: CompletionEvent) -> CompletionEvent | None:
        """The event to give the caller for `event` (None: they have it already)."""
        if isinstance(event, Started):
            if self.started is None:
                self.started = event
                return event
            return None
        if self.started is None:
            raise Unavailable(f"{SERVICE} sent {event} before the completion's first event")
        if isinstance(event, Finished):
            if self.replayed != self.received:
                raise _diverged(self.received, self.replayed)
            return event
        self.replayed += event.text
        if not (self.replayed.startswith(self.received) or self.received.startswith(self.replayed)):
            raise _diverged(self.received, self.replayed)
        if len(self.replayed) <= len(self.received):
            return None
        fresh = self.replayed[len(self.received) :]
        self.received = self.replayed
        return event if fresh == event.text else Delta(fresh, event.raw)


def _diverged(received: str, replayed: str) -> CompletionDiverged:
    return CompletionDiverged(
        "the completion was retried and the retry's reply does not continue the text already received "
        f"({len(received)} characters; the retry sent {replayed[:80]!r}...); read the chat's messages "
        "for the stored reply",
        received,
    )
