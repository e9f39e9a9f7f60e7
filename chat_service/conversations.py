"""The chat use cases: durable, idempotent, streamed completions over a conversation store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from chat_service.domain import Chat, ChatCursor, ChatUpdate, FinishReason, HistoryStrategy, Message
from chat_service.history import HistoryBuilder
from chat_service.inference import EngineInfo, Generated, InferenceClient, PromptMessage, SamplingOptions
from chat_service.storage.base import ConversationStore
from chatmesh.common.errors import ChatmeshError, Unavailable

log = logging.getLogger(__name__)


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
    """Last event: the stored assistant message."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    assistant_message_id: uuid.UUID
    cached: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    """Last event of a stream that broke after it started; the error itself is raised right after."""

    error: ChatmeshError


CompletionEvent = Started | Delta | Finished | Failed


async def _prepend(
    first: str | Generated, rest: AsyncGenerator[str | Generated, None]
) -> AsyncGenerator[str | Generated, None]:
    yield first
    async for event in rest:
        yield event


class _Broadcast:
    """Events of one in-flight completion, replayable to a retry that joins it."""

    def __init__(self) -> None:
        self._events: list[CompletionEvent] = []
        self._closed = False
        self._changed = asyncio.Event()

    def publish(self, event: CompletionEvent) -> None:
        self._events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    async def follow(self) -> AsyncGenerator[CompletionEvent, None]:
        seen = 0
        while True:
            changed = self._changed
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            if self._closed:
                return
            await changed.wait()


class Conversations:
    """Chats for authenticated users. Every method takes the caller's user id first."""

    def __init__(
        self,
        store: ConversationStore,
        inference: InferenceClient,
        history: HistoryBuilder,
        engine: EngineInfo,
        default_strategy: HistoryStrategy,
    ) -> None:
        self._store = store
        self._inference = inference
        self._history = history
        self._engine = engine
        self._default_strategy = default_strategy
        # Completions running in this process, by user message id, so a retry can join one.
        self._in_flight: dict[uuid.UUID, _Broadcast] = {}

    @property
    def engine(self) -> EngineInfo:
        return self._engine

    async def create_chat(
        self,
        user_id: str,
        title: str,
        system_prompt: str,
        strategy: HistoryStrategy | None,
        first_message: str | None,
        sampling: SamplingOptions,
        request_id: str | None,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Create a chat; with a first message, stream its reply like `complete`."""
        if not first_message:
            chat, _ = await self._store.create_chat(
                user_id, title, system_prompt, strategy or self._default_strategy, request_id
            )
            yield Started(chat.id, None, chat)
            return
        chat, _ = await self._store.create_chat(
            user_id, title, system_prompt, strategy or self._default_strategy, request_id
        )
        async with aclosing(self.complete(user_id, chat.id, first_message, sampling, request_id)) as events:
            async for event in events:
                yield (
                    Started(event.chat_id, event.user_message_id, chat)
                    if isinstance(event, Started)
                    else event
                )

    async def complete(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        content: str,
        sampling: SamplingOptions,
        request_id: str | None,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Store the user message, stream the reply, store the reply."""
        # Everything before the first token is on the user's clock: the engine counts the message's
        # tokens while the store checks the chat and reads its history, and one transaction does it all.
        received = time.perf_counter()
        counting = asyncio.ensure_future(self._inference.count_tokens([PromptMessage("user", content)]))
        try:
            turn = await self._store.start_turn(user_id, chat_id, content, counting, request_id)
        finally:
            if not counting.done():
                counting.cancel()  # the store failed first (e.g. not the user's chat)
            elif not counting.cancelled():
                counting.exception()  # retrieved, so an error the store already surfaced is not logged twice
        if not turn.created:
            async with aclosing(self._replay(turn.chat, turn.message, sampling)) as replayed:
                async for event in replayed:
                    yield event
            return
        broadcast = _Broadcast()
        self._in_flight[turn.message.id] = broadcast
        try:
            async with aclosing(
                self._generate(turn.chat, turn.message, sampling, turn.history, received)
            ) as events:
                async for event in events:
                    broadcast.publish(event)
                    yield event
        finally:
            broadcast.close()
            del self._in_flight[turn.message.id]

    async def _generate(
        self,
        chat: Chat,
        user_message: Message,
        sampling: SamplingOptions,
        history: Sequence[Message] | None,
        received: float,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Stream and store the reply to `user_message`; `history` (through that message) saves a read.
        `received` is when the request arrived, for the time-to-first-token log."""
        max_tokens = sampling.max_tokens or self._engine.default_max_tokens
        sampling = SamplingOptions(max_tokens, sampling.temperature, sampling.top_p, sampling.seed)
        request_id = str(user_message.id)
        pieces: list[str] = []
        finished: Generated | None = None
        started = received
        # The prompt is built and the engine started while the first event goes out: both sit on the
        # path to the first token.
        opening = asyncio.ensure_future(self._open_stream(chat, user_message, history, sampling, request_id))
        first_token_s: float | None = None
        try:
            yield Started(chat.id, user_message.id)
            stream, first, engine_ttft_s = await opening
            async with aclosing(stream):
                events = _prepend(first, stream)
                async for event in events:
                    if isinstance(event, Generated):
                        finished = event
                    else:
                        pieces.append(event)
                        yield Delta(event)
                        if first_token_s is None:
                            first_token_s = time.perf_counter() - started
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away (cancelled while we awaited, or closed while we yielded): keep what
            # it already saw, marked as stopped (as ChatGPT does), and stop the engine.
            await asyncio.shield(self._abandon(opening))
            await asyncio.shield(self._store_reply(chat, user_message, pieces, FinishReason.CANCELLED, None))
            raise
        except ChatmeshError as exc:
            # The user message stays; no half-written reply is stored. The stream already started, so
            # the error travels as an event before the status (HTTP clients see only the event).
            yield Failed(
                exc if not isinstance(exc, Unavailable) else Unavailable(f"generation failed: {exc}")
            )
            raise
        if finished is None:
            error = Unavailable("the inference service ended the stream without finishing; retry")
            yield Failed(error)
            raise error
        reply = await self._store_reply(chat, user_message, pieces, finished.finish_reason, finished)
        log.info(
            "completion stored",
            extra={
                "chat_id": str(chat.id),
                "seconds": round(time.perf_counter() - started, 3),
                "completion_tokens": finished.completion_tokens,
                # Time to first token as this service saw it, and the engine's share of it.
                "ttft_ms": round(first_token_s * 1000, 2) if first_token_s is not None else None,
                "engine_ttft_ms": round(engine_ttft_s * 1000, 2),
            },
        )
        yield Finished(finished.finish_reason, finished.prompt_tokens, finished.completion_tokens, reply.id)

    async def _open_stream(
        self,
        chat: Chat,
        user_message: Message,
        history: Sequence[Message] | None,
        sampling: SamplingOptions,
        request_id: str,
    ) -> tuple[AsyncGenerator[str | Generated, None], str | Generated, float]:
        """Build the prompt, start generating, and wait for the engine's first event; also returns how
        long the engine took to send it."""
        if history is None:
            stored = await self._store.history(chat.user_id, chat.id)
            history = [m for m in stored if m.seq <= user_message.seq]
        assert sampling.max_tokens is not None
        prompt = await self._history.build(chat, history, sampling.max_tokens, request_id)
        stream = self._inference.generate(prompt, sampling, request_id)
        engine_started = time.perf_counter()
        try:
            return stream, await anext(stream), time.perf_counter() - engine_started
        except BaseException:
            await stream.aclose()
            raise

    @staticmethod
    async def _abandon(
        opening: asyncio.Future[tuple[AsyncGenerator[str | Generated, None], str | Generated, float]],
    ) -> None:
        """Stop a stream that `_open_stream` may still be opening."""
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        elif not opening.cancelled() and opening.exception() is None:
            await opening.result()[0].aclose()

    async def _store_reply(
        self,
        chat: Chat,
        user_message: Message,
        pieces: Sequence[str],
        reason: FinishReason,
        usage: Generated | None,
    ) -> Message:
        text = "".join(pieces)
        tokens = usage.completion_tokens if usage else len(pieces)
        reply, _ = await self._store.add_assistant_message(
            chat.user_id,
            chat.id,
            user_message.id,
            text,
            tokens,
            reason,
            usage.prompt_tokens if usage else None,
        )
        return reply

    async def _replay(
        self, chat: Chat, user_message: Message, sampling: SamplingOptions
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A retried request: join the completion if it is running here, else return the stored reply,
        else (the first attempt failed or died elsewhere) generate it now."""
        broadcast = self._in_flight.get(user_message.id)
        if broadcast is not None:
            async for event in broadcast.follow():
                yield event
            return
        reply = await self._store.find_reply(chat.user_id, user_message.id)
        if reply is None:
            async with aclosing(
                self._generate(chat, user_message, sampling, None, time.perf_counter())
            ) as events:
                async for event in events:
                    yield event
            return
        yield Started(chat.id, user_message.id)
        if reply.content:
            yield Delta(reply.content)
        yield Finished(
            reply.finish_reason or FinishReason.STOP, reply.prompt_tokens or 0, reply.token_count, reply.id
        )

    async def list_chats(self, user_id: str, limit: int, after: ChatCursor | None) -> Sequence[Chat]:
        return await self._store.list_chats(user_id, limit, after)

    async def messages(
        self, user_id: str, chat_id: uuid.UUID, limit: int, after_seq: int | None
    ) -> Sequence[Message]:
        return await self._store.messages_page(user_id, chat_id, limit, after_seq)

    async def update_chat(self, user_id: str, chat_id: uuid.UUID, update: ChatUpdate) -> Chat:
        return await self._store.update_chat(user_id, chat_id, update)

    async def delete_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        await self._store.delete_chat(user_id, chat_id)
