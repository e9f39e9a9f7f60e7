"""Generating a chat's reply: build the prompt from the history, stream the engine's reply, store it (or,
when nobody follows any more, the part generated so far, marked cancelled), holding the completion's
lease meanwhile. One turn's steps, in the order they run: `_open` (prompt and the engine's first event),
`Started`, `_relay` (the engine's pieces as `Delta`s), `_store_finished` and `Finished`; or
`_store_abandoned` when the caller left, or `_failed` when the engine or the store failed."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from chat_service.conversations.events import CompletionEvent, Delta, Failed, Finished, Started
from chat_service.conversations.futures import discard
from chat_service.conversations.leases import CompletionLeases
from chat_service.conversations.token_counts import QuestionTokens
from chat_service.domain import Chat, FinishReason, Message
from chat_service.history import HistoryBuilder
from chat_service.inference import EngineInfo, Generated, InferenceClient, SamplingOptions
from chat_service.metrics import ChatMetrics
from chat_service.storage.base import ConversationStore
from chatmesh.common.errors import ChatmeshError, Unavailable

log = logging.getLogger(__name__)

EngineStream = AsyncGenerator[str | Generated, None]
"""What the engine streams: text pieces, then one `Generated`."""


def with_default_length(sampling: SamplingOptions, engine: EngineInfo) -> SamplingOptions:
    """`sampling` with the engine's default reply length where the caller set none."""
    return dataclasses.replace(sampling, max_tokens=sampling.max_tokens or engine.default_max_tokens)


@dataclass
class _Turn:
    """One generation's progress, which its steps share."""

    chat: Chat
    question: Message
    received: float
    """When the request arrived (`time.perf_counter()`), for the time-to-first-token log."""
    pieces: list[str] = field(default_factory=list)
    finished: Generated | None = None
    counting: asyncio.Future[int] | None = None
    first_token_s: float | None = None
    engine_ttft_s: float = 0.0


class Generation:
    """Streams and stores the engine's replies to stored user messages."""

    def __init__(
        self,
        store: ConversationStore,
        inference: InferenceClient,
        history: HistoryBuilder,
        engine: EngineInfo,
        leases: CompletionLeases,
        tokens: QuestionTokens,
        metrics: ChatMetrics,
    ) -> None:
        self._store = store
        self._inference = inference
        self._history = history
        self._engine = engine
        self._leases = leases
        self._tokens = tokens
        self._metrics = metrics

    async def run(
        self,
        chat: Chat,
        question: Message,
        sampling: SamplingOptions,
        history: Sequence[Message] | None,
        received: float,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Stream and store the reply to `question`, the chat's stored user message; `history` (through
        that message) saves a read. Its token count is taken beside the reply and recorded with it, so no
        transaction waits on the engine. The events: `Started`, `Delta`s, `Finished`; a failure after
        `Started` is a `Failed` event, then its error raised; before, only the error."""
        turn = _Turn(chat, question, received)
        sampling = with_default_length(sampling, self._engine)
        opening = asyncio.ensure_future(self._open(chat, question, history, sampling))
        keeping = asyncio.ensure_future(self._leases.keep(chat.user_id, question.id))
        announced = False
        try:
            stream, first, turn.engine_ttft_s = await opening
            # Announced once the engine has taken the request and sent its first event: a refusal before
            # (engine busy, prompt too long, engine down) is the call's status, a fast 429/400/503 with
            # its details before any byte of the answer, not an error event after a 200. The first token
            # is as early either way.
            yield Started(chat.id, question.id)
            announced = True
            turn.counting = self._tokens.start(question)
            async with aclosing(self._relay(stream, first, turn)) as deltas:
                async for delta in deltas:
                    yield delta
            reply = await self._store_finished(turn)
        except (asyncio.CancelledError, GeneratorExit):
            # Nobody follows any more (cancelled while we awaited, or closed while we yielded).
            await self._store_abandoned(opening, turn)
            raise
        except Exception as exc:
            error = await self._failed(turn, exc)
            if announced:
                yield Failed(error)
            if error is exc:
                raise
            raise error from exc
        finally:
            discard(turn.counting)
            keeping.cancel()
        assert turn.finished is not None
        _log_stored(turn)
        finished = turn.finished
        yield Finished(finished.finish_reason, finished.prompt_tokens, finished.completion_tokens, reply.id)

    async def _open(
        self,
        chat: Chat,
        question: Message,
        history: Sequence[Message] | None,
        sampling: SamplingOptions,
    ) -> tuple[EngineStream, str | Generated, float]:
        """Build the prompt, start generating, and wait for the engine's first event; also returns how
        long the engine took to send it."""
        if history is None:
            stored = await self._store.history(chat.user_id, chat.id)
            history = [m for m in stored if m.seq <= question.seq]
        assert sampling.max_tokens is not None
        request_id = str(question.id)
        prompt = await self._history.build(chat, history, sampling.max_tokens, request_id)
        self._metrics.history_built(chat.history_strategy.value)
        stream = self._inference.generate(prompt, sampling, request_id, affinity=str(chat.id))
        engine_started = time.perf_counter()
        try:
            return stream, await anext(stream), time.perf_counter() - engine_started
        except BaseException:
            await stream.aclose()
            raise

    @staticmethod
    async def _relay(
        stream: EngineStream, first: str | Generated, turn: _Turn
    ) -> AsyncGenerator[Delta, None]:
        """The engine's pieces as `Delta`s (from `first`, already read), noting them and the `Generated`
        that ends them in `turn`. The engine's stream is closed when this is."""
        async with aclosing(stream):
            async for event in _prepend(first, stream):
                if isinstance(event, Generated):
                    turn.finished = event
                    continue
                turn.pieces.append(event)
                yield Delta(event)
                if turn.first_token_s is None:
                    turn.first_token_s = time.perf_counter() - turn.received

    async def _store_finished(self, turn: _Turn) -> Message:
        """Store the reply the engine finished, with the question's token count if known by now."""
        if turn.finished is None:
            raise Unavailable("the inference service ended the stream without finishing; retry")
        finished = turn.finished
        return await self._store_reply(
            turn, finished.finish_reason, finished, self._tokens.known(turn.counting)
        )

    async def _store_abandoned(
        self, opening: asyncio.Future[tuple[EngineStream, str | Generated, float]], turn: _Turn
    ) -> None:
        """Keep what was generated, marked as stopped (as ChatGPT does), and stop the engine; shielded,
        as the caller is being cancelled."""
        await asyncio.shield(_abandon(opening))
        counted = self._tokens.known(turn.counting)
        await asyncio.shield(self._store_reply(turn, FinishReason.CANCELLED, None, counted))

    async def _failed(self, turn: _Turn, exc: Exception) -> ChatmeshError:
        """What the caller hears of a failure: a domain error as it is (an engine that is unavailable, as
        a failed generation), anything else (a bug, the database driver) as an internal error, with the
        details in the log rather than in the reply. The user message stays, counted; no half-written
        reply is stored; and before the error reaches the client, its retry, on any replica, may start
        at once."""
        if isinstance(exc, ChatmeshError):
            error = exc if not isinstance(exc, Unavailable) else Unavailable(f"generation failed: {exc}")
        else:
            log.exception("completion failed", extra={"chat_id": str(turn.chat.id)})
            error = ChatmeshError("the completion failed unexpectedly; see the chat service log")
        await self._leases.end_unanswered(turn.question, self._tokens.known(turn.counting))
        return error

    async def _store_reply(
        self, turn: _Turn, reason: FinishReason, usage: Generated | None, question_tokens: int | None
    ) -> Message:
        reply, _ = await self._store.add_assistant_message(
            turn.chat.user_id,
            turn.chat.id,
            turn.question.id,
            "".join(turn.pieces),
            usage.completion_tokens if usage else len(turn.pieces),
            reason,
            usage.prompt_tokens if usage else None,
            question_tokens,
        )
        return reply


async def _prepend(first: str | Generated, rest: EngineStream) -> EngineStream:
    yield first
    async for event in rest:
        yield event


async def _abandon(opening: asyncio.Future[tuple[EngineStream, str | Generated, float]]) -> None:
    """Stop a stream that `Generation._open` may still be opening."""
    opening.cancel()
    try:
        stream = (await opening)[0]
    except asyncio.CancelledError:
        return  # stopped before the engine started (or while it sent its first event)
    except Exception:
        # It failed on its own just as nobody was waiting any more: nobody to tell but the log.
        log.warning("a completion failed while it was being abandoned", exc_info=True)
        return
    await stream.aclose()


def _log_stored(turn: _Turn) -> None:
    assert turn.finished is not None
    log.info(
        "completion stored",
        extra={
            "chat_id": str(turn.chat.id),
            "seconds": round(time.perf_counter() - turn.received, 3),
            "completion_tokens": turn.finished.completion_tokens,
            # Time to first token as this service saw it, and the engine's share of it.
            "ttft_ms": round(turn.first_token_s * 1000, 2) if turn.first_token_s is not None else None,
            "engine_ttft_ms": round(turn.engine_ttft_s * 1000, 2),
        },
    )
