"""The chat use cases: durable, idempotent, streamed completions over a conversation store."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine, Sequence
from contextlib import aclosing
from typing import Any

from opentelemetry import trace

from chat_service.cache.policy import CachedAnswer, NoCache, Question, ResponseCache
from chat_service.conversations.events import (
    CompletionEvent,
    Delta,
    Failed,
    Finished,
    Started,
    is_terminal,
    stored_reply_events,
    with_outcome_metric,
)
from chat_service.conversations.in_flight import InFlight
from chat_service.conversations.leases import CompletionLeases
from chat_service.domain import Chat, ChatCursor, ChatUpdate, FinishReason, HistoryStrategy, Message
from chat_service.history import HistoryBuilder
from chat_service.inference import EngineInfo, Generated, InferenceClient, PromptMessage, SamplingOptions
from chat_service.limits import CompletionDurations, CompletionLimit
from chat_service.metrics import ChatMetrics, NoMetrics
from chat_service.storage.base import NOT_COUNTED, ConversationStore, Lease
from chatmesh.common.errors import ChatmeshError, Unavailable

# The events are part of this module's interface: callers import them from here (or the package).
__all__ = [
    "CompletionEvent",
    "Conversations",
    "Delta",
    "Failed",
    "Finished",
    "Started",
    "stored_reply_events",
]

log = logging.getLogger(__name__)


async def _prepend(
    first: str | Generated, rest: AsyncGenerator[str | Generated, None]
) -> AsyncGenerator[str | Generated, None]:
    yield first
    async for event in rest:
        yield event


class Conversations:
    """Chats for authenticated users. Every method takes the caller's user id first."""

    def __init__(
        self,
        store: ConversationStore,
        inference: InferenceClient,
        history: HistoryBuilder,
        engine: EngineInfo,
        default_strategy: HistoryStrategy,
        cache: ResponseCache | None = None,
        *,
        replica_id: str | None = None,
        lease_s: float = 15.0,
        poll_interval_s: float = 0.2,
        metrics: ChatMetrics | None = None,
        max_completions_per_user: int = 0,
    ) -> None:
        self._metrics = metrics or NoMetrics()
        self._store = store
        self._inference = inference
        self._history = history
        self._engine = engine
        self._default_strategy = default_strategy
        self._cache = cache or NoCache()
        # Completions running in *other* replicas are known by their lease in the store: the replica that
        # generates a reply holds it (renewed every third of `lease_s`), so a retry that lands elsewhere
        # waits for that reply rather than generating a second one, and takes over once it lapses.
        self.leases = CompletionLeases(
            store, Lease(replica_id or f"replica-{uuid.uuid4().hex[:12]}", lease_s), poll_interval_s
        )
        # Each completion stream (chat or stateless) holds one of its user's slots, counted in the store
        # across replicas, from before anything is written until it ends.
        self._limit = CompletionLimit(store, self.leases.lease, max_completions_per_user)
        # Completions running in this process, by user message id, so a retry can join one.
        self._in_flight = InFlight()
        # Cache writes that run after their answer was sent; kept so they are not collected mid-way
        # and can be waited for at shutdown.
        self._background: set[asyncio.Task[None]] = set()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Wait (up to `timeout_s`) for cache writes still under way."""
        if self._background:
            await asyncio.wait(self._background, timeout=timeout_s)

    @property
    def engine(self) -> EngineInfo:
        return self._engine

    @property
    def completion_durations(self) -> CompletionDurations:
        """How long completions took here lately (for the retry hints of per-user limits)."""
        return self._limit.durations

    async def create_chat(
        self,
        user_id: str,
        title: str,
        system_prompt: str,
        strategy: HistoryStrategy | None,
        first_message: str | None,
        sampling: SamplingOptions,
        request_id: str | None,
        use_cache: bool = True,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Create a chat; with a first message, stream its reply like `complete` (and, like it, only
        within the user's limit of concurrent completions: beyond it, `ResourceExhausted` before anything
        is stored).

        A first message's cache lookup depends on nothing stored (no turns come before it), so it runs
        while the chat and the message are written rather than after."""
        if not first_message:
            chat, _ = await self._store.create_chat(
                user_id, title, system_prompt, strategy or self._default_strategy, request_id
            )
            yield Started(chat.id, None, chat)
            return
        creating = self._create_and_complete(
            user_id, title, system_prompt, strategy, first_message, sampling, request_id, use_cache
        )
        key = f"create\n{request_id}" if request_id else None
        async with aclosing(self._within_limit(user_id, creating, key)) as events:
            async for event in events:
                yield event

    async def _create_and_complete(
        self,
        user_id: str,
        title: str,
        system_prompt: str,
        strategy: HistoryStrategy | None,
        first_message: str,
        sampling: SamplingOptions,
        request_id: str | None,
        use_cache: bool,
    ) -> AsyncGenerator[CompletionEvent, None]:
        early_lookup = (
            asyncio.ensure_future(
                self._cache.lookup(Question(user_id, None, system_prompt, (), first_message))
            )
            if use_cache
            else None
        )
        try:
            chat, _ = await self._store.create_chat(
                user_id, title, system_prompt, strategy or self._default_strategy, request_id
            )
        except BaseException:
            _discard(early_lookup)
            raise
        async with aclosing(
            self._complete(user_id, chat.id, first_message, sampling, request_id, use_cache, early_lookup)
        ) as events:
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
        use_cache: bool = True,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Store the user message, stream the reply, store the reply (with the message's token count).

        The stream holds one of the user's concurrent completions from its start to its end, in every
        replica: beyond the limit, `ResourceExhausted` (with a retry hint) before anything is stored.

        The reply comes from the semantic cache when it holds a verified answer to the same question in
        the same context (`use_cache=False`: neither look up nor store).

        A retry (same `request_id`) joins the completion if it is still running here, returns the stored
        reply if there is one (a cancelled one included, with `FinishReason.CANCELLED`), and generates
        it otherwise. Either way the stream ends with exactly one `Finished`, or one `Failed` followed by
        its error raised.
        """
        completing = self._complete(user_id, chat_id, content, sampling, request_id, use_cache)
        key = f"complete\n{chat_id}\n{request_id}" if request_id else None
        async with aclosing(self._within_limit(user_id, completing, key)) as events:
            async for event in events:
                yield event

    async def _complete(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        content: str,
        sampling: SamplingOptions,
        request_id: str | None,
        use_cache: bool = True,
        early_lookup: asyncio.Future[CachedAnswer | None] | None = None,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """`complete` without its slot (the caller holds it). `early_lookup`: the cache lookup, already
        started for `content` as the first message of the chat (used only if it is)."""
        received = time.perf_counter()
        try:
            turn = await self._store.start_turn(
                user_id, chat_id, content, request_id, lease=self.leases.lease
            )
        except BaseException:
            _discard(early_lookup)
            raise
        if turn.created:
            running = self._in_flight.run(
                turn.message.id,
                lambda: self._with_outcome_metric(
                    self._answer(
                        turn.chat, turn.message, sampling, turn.history, received, use_cache, early_lookup
                    )
                ),
            )
        else:
            _discard(early_lookup)
            running = await self._in_flight.join(
                turn.message.id, lambda: self._resume(turn.chat, turn.message, sampling)
            )
        async with aclosing(running.follow()) as events:
            async for event in events:
                yield event

    def answer(
        self,
        user_id: str,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        use_cache: bool = True,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A reply to `messages`, the caller's whole conversation (the last message the user's), stored
        nowhere: the stateless completion of the OpenAI-compatible API. Same engine and admission as a
        chat's completion, and the same per-user semantic cache, keyed by the same context (system
        prompt and earlier turns). Streams `Delta`s, then one `Finished` (no message id); a failure is
        raised, also after text has streamed. Counts against the user's concurrent completions like a
        chat's."""
        return self._within_limit(
            user_id,
            self._with_outcome_metric(
                self._answer_messages(user_id, messages, sampling, request_id, use_cache)
            ),
        )

    async def _within_limit(
        self,
        user_id: str,
        events: AsyncGenerator[CompletionEvent, None],
        request_key: str | None = None,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """`events`, holding one of the user's completion slots from the first to the last (shared by a
        retry with the same `request_key`, see `CompletionLimit.slot`)."""
        async with self._limit.slot(user_id, request_key) as held, aclosing(events):
            async for event in events:
                if is_terminal(event):
                    # Before the client hears the end: it may ask again at once, on any replica.
                    await held.release()
                yield event

    async def _answer_messages(
        self,
        user_id: str,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        use_cache: bool,
    ) -> AsyncGenerator[CompletionEvent, None]:
        turns = [m for m in messages if m.role != "system"]
        question = (
            Question(
                user_id=user_id,
                chat_id=None,
                system_prompt="\n\n".join(m.content for m in messages if m.role == "system"),
                earlier_turns=[(m.role, m.content) for m in turns[:-1]],
                text=turns[-1].content,
            )
            if use_cache and turns
            else None
        )
        span = trace.get_current_span()
        span.set_attribute("gen_ai.request.model", self._engine.model)
        if question is not None:
            cached = await self._cache.lookup(question)
            span.set_attribute("chatmesh.cache.hit", cached is not None)
            if cached is not None:
                if cached.text:
                    yield Delta(cached.text)
                yield Finished(FinishReason.STOP, 0, 0, None, cached=True)
                return
        pieces: list[str] = []
        finished: Generated | None = None
        stream = self._inference.generate(messages, self._with_length(sampling), request_id)
        async with aclosing(stream):
            async for event in stream:
                if isinstance(event, Generated):
                    finished = event
                else:
                    pieces.append(event)
                    yield Delta(event)
        if finished is None:
            raise Unavailable("the inference service ended the stream without finishing; retry")
        answer = Finished(finished.finish_reason, finished.prompt_tokens, finished.completion_tokens, None)
        self._answered(span, question, "".join(pieces), answer)
        yield answer

    def _with_length(self, sampling: SamplingOptions) -> SamplingOptions:
        """`sampling` with the engine's default reply length where the caller set none."""
        return dataclasses.replace(
            sampling, max_tokens=sampling.max_tokens or self._engine.default_max_tokens
        )

    def _answered(self, span: trace.Span, question: Question | None, text: str, finished: Finished) -> None:
        """Record a generated answer on the call's span, and keep it in the cache when it is a finished
        one (`stop`: never a `length`, cancelled or failed answer)."""
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": finished.prompt_tokens,
                "gen_ai.usage.output_tokens": finished.completion_tokens,
                "gen_ai.response.finish_reasons": [finished.finish_reason.value],
            }
        )
        if question is not None and finished.finish_reason == FinishReason.STOP:
            self._in_background(self._cache.store(question, text, finished.completion_tokens))

    async def _resume(
        self, chat: Chat, user_message: Message, sampling: SamplingOptions
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A retried message that nothing here is completing: return its stored reply; else, if another
        replica is generating it (its lease runs), wait for that reply; else (the first attempt failed,
        or its replica died and the lease lapsed) generate it now.

        Registered as running before the reply is looked up, so a completion of this message that ended
        earlier here has stored its reply by then, and none can start here meanwhile."""
        # While another replica holds the lease, its reply lands in the store (or the lease lapses).
        reply = await self.leases.reply_or_take(chat.user_id, user_message.id)
        if reply is not None:
            for event in stored_reply_events(chat.id, user_message.id, reply):
                yield event
            return
        # Generated here, so counted here; a reply waited for or replayed is the completion of whichever
        # attempt generated it, and counted there.
        async with aclosing(
            self._with_outcome_metric(self._generate(chat, user_message, sampling, None, time.perf_counter()))
        ) as events:
            async for event in events:
                yield event

    def _with_outcome_metric(
        self, events: AsyncGenerator[CompletionEvent, None]
    ) -> AsyncGenerator[CompletionEvent, None]:
        return with_outcome_metric(events, self._metrics)

    async def _answer(
        self,
        chat: Chat,
        user_message: Message,
        sampling: SamplingOptions,
        history: Sequence[Message],
        received: float,
        use_cache: bool,
        early_lookup: asyncio.Future[CachedAnswer | None] | None = None,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """The reply from the cache when it holds a verified one, else generated and then kept in the
        cache (finished answers only: never a `length`, cancelled or failed one). `early_lookup` is the
        lookup of the message as a chat's first, started before it was stored."""
        question = (
            Question(
                user_id=chat.user_id,
                chat_id=chat.id,
                system_prompt=chat.system_prompt,
                earlier_turns=[(m.role.value, m.content) for m in history if m.seq < user_message.seq],
                text=user_message.content,
            )
            if use_cache
            else None
        )
        span = trace.get_current_span()  # the call's server span when tracing is on; else a no-op
        span.set_attributes({"chatmesh.chat_id": str(chat.id), "gen_ai.request.model": self._engine.model})
        if question is None:
            _discard(early_lookup)
        else:
            if early_lookup is not None and not question.earlier_turns:
                cached = await early_lookup
            else:
                _discard(early_lookup)
                cached = await self._cache.lookup(question)
            span.set_attribute("chatmesh.cache.hit", cached is not None)
            if cached is not None:
                async with aclosing(self._serve_cached(chat, user_message, cached, received)) as events:
                    async for event in events:
                        yield event
                return
        pieces: list[str] = []
        async with aclosing(self._generate(chat, user_message, sampling, history, received)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    self._answered(span, question, "".join(pieces), event)
                yield event

    async def _serve_cached(
        self, chat: Chat, user_message: Message, cached: CachedAnswer, received: float
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A cached answer in the shape of a generated one, stored in the history like any answer (before
        it is sent, so a client that leaves early still finds it there)."""
        reply, _ = await self._store.add_assistant_message(
            chat.user_id,
            chat.id,
            user_message.id,
            cached.text,
            cached.token_count,
            FinishReason.STOP,
            None,
            None,
        )
        log.info(
            "completion served from the cache",
            extra={
                "chat_id": str(chat.id),
                "entry_id": cached.entry_id,
                "score": round(cached.score, 4),
                "seconds": round(time.perf_counter() - received, 4),
            },
        )
        yield Started(chat.id, user_message.id)
        if cached.text:
            yield Delta(cached.text)
        yield Finished(FinishReason.STOP, 0, 0, reply.id, cached=True)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _generate(  # noqa: PLR0915 (one completion's life, read top to bottom)
        self,
        chat: Chat,
        user_message: Message,
        sampling: SamplingOptions,
        history: Sequence[Message] | None,
        received: float,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Stream and store the reply to `user_message`; `history` (through that message) saves a read.
        The user message's token count (for the history strategies of later turns) is taken once the
        engine has sent its first event: before, it would compete with this prompt for the engine's
        tokenizer on the way to the first token; after, it is done long before the reply ends, and it is
        recorded with the reply, so no transaction waits on the engine. `received` is when the request
        arrived, for the time-to-first-token log."""
        sampling = self._with_length(sampling)
        request_id = str(user_message.id)
        pieces: list[str] = []
        finished: Generated | None = None
        started = received
        opening = asyncio.ensure_future(self._open_stream(chat, user_message, history, sampling, request_id))
        keeping = asyncio.ensure_future(self.leases.keep(chat.user_id, user_message.id))
        counting: asyncio.Future[int] | None = None
        first_token_s: float | None = None
        announced = False
        try:
            stream, first, engine_ttft_s = await opening
            # Announced once the engine has taken the request and sent its first event: a refusal before
            # (engine busy, prompt too long, engine down) is the call's status, a fast 429/400/503 with
            # its details before any byte of the answer, not an error event after a 200. The first token
            # is as early either way.
            yield Started(chat.id, user_message.id)
            announced = True
            counting = self._start_counting(user_message)
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
            if finished is None:
                raise Unavailable("the inference service ended the stream without finishing; retry")
            reply = await self._store_reply(
                chat, user_message, pieces, finished.finish_reason, finished, _counted(counting)
            )
        except (asyncio.CancelledError, GeneratorExit):
            # Nobody follows any more (cancelled while we awaited, or closed while we yielded): keep what
            # was generated, marked as stopped (as ChatGPT does), and stop the engine.
            await asyncio.shield(self._abandon(opening))
            await asyncio.shield(
                self._store_reply(
                    chat, user_message, pieces, FinishReason.CANCELLED, None, _counted(counting)
                )
            )
            raise
        except ChatmeshError as exc:
            # The user message stays; no half-written reply is stored. The stream already started, so
            # the error travels as an event before the status (HTTP clients see only the event), and
            # both say the same.
            # Before the error reaches the client: its retry, on any replica, may start at once.
            await self.leases.end_unanswered(user_message, _counted(counting))
            error = exc if not isinstance(exc, Unavailable) else Unavailable(f"generation failed: {exc}")
            if announced:
                yield Failed(error)
            if error is exc:
                raise
            raise error from exc
        except Exception as exc:
            # A bug or an unexpected failure (e.g. of the database driver): still exactly one terminal
            # event for every follower, and the details in the log rather than in the reply.
            log.exception("completion failed", extra={"chat_id": str(chat.id)})
            # Before the error reaches the client: its retry, on any replica, may start at once.
            await self.leases.end_unanswered(user_message, _counted(counting))
            internal = ChatmeshError("the completion failed unexpectedly; see the chat service log")
            if announced:
                yield Failed(internal)
            raise internal from exc
        finally:
            _discard(counting)
            keeping.cancel()
        _log_stored(chat, finished, started, first_token_s, engine_ttft_s)
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
        self._metrics.history_built(chat.history_strategy.value)
        stream = self._inference.generate(prompt, sampling, request_id, affinity=str(chat.id))
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

    async def _store_reply(
        self,
        chat: Chat,
        user_message: Message,
        pieces: Sequence[str],
        reason: FinishReason,
        usage: Generated | None,
        question_tokens: int | None,
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
            question_tokens,
        )
        return reply

    def _start_counting(self, user_message: Message) -> asyncio.Future[int] | None:
        """Count the user message's tokens in the background, unless they are already stored."""
        if user_message.token_count != NOT_COUNTED:
            return None
        return asyncio.ensure_future(
            self._inference.count_tokens([PromptMessage("user", user_message.content)])
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
        """Delete a chat, its messages and the answers it left in the cache."""
        await self._store.delete_chat(user_id, chat_id)
        await self._cache.forget_chat(user_id, chat_id)

    async def clear_cache(self, user_id: str) -> int:
        """Delete every cached answer `user_id` stored; returns how many."""
        return await self._cache.clear(user_id)

    # -- what asynchronous jobs need ---------------------------------------------------------------------

    async def store_question(
        self, user_id: str, chat_id: uuid.UUID, content: str, request_id: str | None
    ) -> tuple[Message, bool]:
        """Store a user message to be answered later (idempotent on `request_id`, like `complete`)."""
        return await self._store.add_user_message(user_id, chat_id, content, NOT_COUNTED, request_id)

    async def answer_stored(
        self, user_id: str, user_message_id: uuid.UUID, sampling: SamplingOptions, use_cache: bool
    ) -> Message:
        """The reply to the user's stored message: the stored one if there is one, else generated now
        (joining the generation if one is running here) and stored. Raises what the generation raised;
        `NotFound` once the chat is gone."""
        if (reply := await self._store.find_reply(user_id, user_message_id)) is not None:
            return reply
        running = self._in_flight.following(user_message_id)
        if running is None:
            turn = await self._store.stored_turn(user_id, user_message_id)
            running = self._in_flight.run(
                turn.message.id,
                lambda: self._answer(
                    turn.chat, turn.message, sampling, turn.history, time.perf_counter(), use_cache
                ),
            )
        async with aclosing(running.follow()) as events:
            async for _ in events:
                pass
        reply = await self._store.find_reply(user_id, user_message_id)
        if reply is None:
            raise Unavailable("the completion ended without a stored reply; retry")
        return reply

    def follow_stored(self, user_message_id: uuid.UUID) -> AsyncGenerator[CompletionEvent, None] | None:
        """The events of the completion of a stored message if it is running in this process (from its
        first event), else None. A watcher that leaves early does not abandon it: the job's worker
        follows it too, to its end."""
        running = self._in_flight.following(user_message_id)
        return running.follow() if running is not None else None

    async def find_reply(self, user_id: str, user_message_id: uuid.UUID) -> Message | None:
        """The stored reply to the user's message, if any."""
        return await self._store.find_reply(user_id, user_message_id)


def _log_stored(
    chat: Chat, finished: Generated, started: float, first_token_s: float | None, engine_ttft_s: float
) -> None:
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


def _discard(future: asyncio.Future[Any] | None) -> None:
    """Cancel a count or lookup nobody needs any more; retrieve the error of one that failed, so asyncio
    does not log it as never retrieved (whoever needed it has reported it)."""
    if future is None:
        return
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


def _counted(future: asyncio.Future[int] | None) -> int | None:
    """The count, if it is known."""
    if future is None or not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()
