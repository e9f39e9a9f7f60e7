"""`Conversations`, the chat use cases the servicers and the job worker call: durable, idempotent,
streamed completions over a conversation store. It holds the steps of a turn together (the user's
completion slot, storing the question, joining a running completion, the cache step, generation) and
leaves each to its piece (see the package's docstring)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from chat_service.accounting.ledger import Ledger
from chat_service.accounting.values import UsageEntry, UsageKind, UsageOutcome
from chat_service.cache.policy import CachedAnswer, ResponseCache
from chat_service.conversations.cache_step import CacheStep, chat_question
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
from chat_service.conversations.futures import discard
from chat_service.conversations.generation import Generation
from chat_service.conversations.in_flight import InFlight
from chat_service.conversations.leases import CompletionLeases
from chat_service.conversations.stateless import StatelessAnswers
from chat_service.conversations.token_counts import QuestionTokens
from chat_service.domain import Chat, ChatCursor, ChatUpdate, FinishReason, HistoryStrategy, Message
from chat_service.history import HistoryBuilder
from chat_service.inference import EngineInfo, InferenceClient, PromptMessage, SamplingOptions, ServedModels
from chat_service.limits import CompletionDurations, CompletionLimit
from chat_service.metrics import ChatMetrics, NoMetrics
from chat_service.storage.base import NOT_COUNTED, ConversationStore, Lease
from chatmesh.common.errors import Unavailable

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


class Conversations:
    """Chats for authenticated users. Every method takes the caller's user id first."""

    def __init__(
        self,
        store: ConversationStore,
        inference: InferenceClient,
        history: HistoryBuilder,
        models: ServedModels,
        default_strategy: HistoryStrategy,
        cache: ResponseCache | None = None,
        *,
        replica_id: str | None = None,
        lease_s: float = 15.0,
        poll_interval_s: float = 0.2,
        metrics: ChatMetrics | None = None,
        max_completions_per_user: int = 0,
        ledger: Ledger | None = None,
    ) -> None:
        self._metrics = metrics or NoMetrics()
        # None: accounting off (no usage records, no budgets).
        self._ledger = ledger
        self._store = store
        self._models = models
        self._default_strategy = default_strategy
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
        self._cache = CacheStep(cache)
        self._generation = Generation(
            store, inference, history, self.leases, QuestionTokens(inference), self._metrics, ledger
        )
        self._stateless = StatelessAnswers(inference, models, self._cache)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Wait (up to `timeout_s`) for cache writes still under way."""
        await self._cache.close(timeout_s)

    @property
    def models(self) -> ServedModels:
        """The models served: a chat's model, and the stateless answer's, is one of them."""
        return self._models

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
        *,
        model: str = "",
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Create a chat answered by `model` (a served model's name, "" the default: the chat stores
        the name it resolves to; one not served is `NotFound` naming the served ones, before anything is
        stored); with a first message, stream its reply like `complete` (and, like it, only within the
        user's limit of concurrent completions: beyond it, `ResourceExhausted` before anything is
        stored).

        A first message's cache lookup depends on nothing stored (no turns come before it), so it runs
        while the chat and the message are written rather than after."""
        engine = self._models.resolve(model)
        if not first_message:
            chat, _ = await self._store.create_chat(
                user_id,
                title,
                system_prompt,
                strategy or self._default_strategy,
                request_id,
                model=engine.model,
            )
            yield Started(chat.id, None, chat)
            return
        creating = self._create_and_complete(
            user_id, title, system_prompt, strategy, first_message, sampling, request_id, use_cache, engine
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
        engine: EngineInfo,
    ) -> AsyncGenerator[CompletionEvent, None]:
        early_lookup = self._cache.first_message_lookup(
            user_id, system_prompt, first_message, use_cache, engine.model
        )
        try:
            chat, _ = await self._store.create_chat(
                user_id,
                title,
                system_prompt,
                strategy or self._default_strategy,
                request_id,
                model=engine.model,
            )
        except BaseException:
            discard(early_lookup)
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
            discard(early_lookup)
            raise
        if turn.created:
            running = self._in_flight.run(
                turn.message.id,
                lambda: self._metered(
                    self._answer(
                        turn.chat, turn.message, sampling, turn.history, received, use_cache, early_lookup
                    ),
                    self._models.of_chat(turn.chat.model).model,
                ),
            )
        else:
            discard(early_lookup)
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
        *,
        model: str = "",
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A reply to `messages`, the caller's whole conversation (the last message the user's), from
        `model` (a served model's name, "" the default; one not served is `NotFound` naming the served
        ones, before anything streams), stored nowhere: the stateless completion of the OpenAI-compatible
        API. Same engines and admission as a chat's completion, and the same per-user semantic cache,
        keyed by the same context (model, system prompt and earlier turns). Streams `Delta`s, then one
        `Finished` (no message id); a failure is raised, also after text has streamed. Counts against
        the user's concurrent completions like a chat's."""
        engine = self._models.resolve(model)
        answering = self._stateless.answer(user_id, messages, sampling, request_id, use_cache, engine.model)
        if self._ledger is not None:
            answering = self._recorded(user_id, engine.model, answering)
        return self._within_limit(user_id, self._metered(answering, engine.model))

    async def _recorded(
        self, user_id: str, model: str, events: AsyncGenerator[CompletionEvent, None]
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A stateless answer's `events`, its usage recorded (it stores no reply to record it with) when it
        finishes, before the caller hears the end."""
        assert self._ledger is not None
        received = time.perf_counter()
        first_token_s: float | None = None
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Delta):
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - received
                elif isinstance(event, Finished):
                    await self._ledger.record(
                        UsageEntry(
                            user_id=user_id,
                            kind=UsageKind.OPENAI,
                            model=model,
                            prompt_tokens=event.prompt_tokens,
                            completion_tokens=event.completion_tokens,
                            cached_tokens=event.cached_tokens if event.cached else 0,
                            outcome=(
                                UsageOutcome.CACHED
                                if event.cached
                                else UsageOutcome(event.finish_reason.value)
                            ),
                            ttft_ms=round(first_token_s * 1000, 2) if first_token_s is not None else None,
                            duration_ms=round((time.perf_counter() - received) * 1000, 2),
                        )
                    )
                yield event

    async def _within_limit(
        self,
        user_id: str,
        events: AsyncGenerator[CompletionEvent, None],
        request_key: str | None = None,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """`events`, holding one of the user's completion slots from the first to the last (shared by a
        retry with the same `request_key`, see `CompletionLimit.slot`), once the user's budgets allow
        it (before anything is stored or looked up: a user over budget gets no completion, not even a
        cached one)."""
        if self._ledger is not None:
            try:
                await self._ledger.admit(user_id)
            except BaseException:
                await events.aclose()
                raise
        async with self._limit.slot(user_id, request_key) as held, aclosing(events):
            async for event in events:
                if is_terminal(event):
                    # Before the client hears the end: it may ask again at once, on any replica.
                    await held.release()
                yield event

    def _answer(
        self,
        chat: Chat,
        question: Message,
        sampling: SamplingOptions,
        history: Sequence[Message],
        received: float,
        use_cache: bool,
        early_lookup: asyncio.Future[CachedAnswer | None] | None = None,
        kind: UsageKind = UsageKind.CHAT,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """The reply, by the chat's model, from the cache when it holds a verified one of that model's,
        else generated and then kept in the cache. `early_lookup` is the lookup of the message as a
        chat's first, started before it was stored."""
        engine = self._models.of_chat(chat.model)
        return self._cache.answer(
            chat_question(chat, engine.model, question, history, use_cache),
            lambda cached: self._serve_cached(chat, engine, question, cached, received, kind),
            lambda: self._generation.run(chat, engine, question, sampling, history, received, kind),
            model=engine.model,
            span_attributes={"chatmesh.chat_id": str(chat.id)},
            early_lookup=early_lookup,
        )

    async def _serve_cached(
        self,
        chat: Chat,
        engine: EngineInfo,
        question: Message,
        cached: CachedAnswer,
        received: float,
        kind: UsageKind = UsageKind.CHAT,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A cached answer in the shape of a generated one, stored in the history like any answer (before
        it is sent, so a client that leaves early still finds it there). The cache served an answer of
        the chat's model (`engine`; its entries are keyed by model), which the reply records."""
        usage = (
            UsageEntry(
                user_id=chat.user_id,
                kind=kind,
                model=engine.model,
                prompt_tokens=0,
                completion_tokens=0,
                cached_tokens=cached.token_count,
                outcome=UsageOutcome.CACHED,
                duration_ms=round((time.perf_counter() - received) * 1000, 2),
                chat_id=chat.id,
            )
            if self._ledger is not None
            else None
        )
        reply, created = await self._store.add_assistant_message(
            chat.user_id,
            chat.id,
            question.id,
            cached.text,
            cached.token_count,
            FinishReason.STOP,
            None,
            None,
            model=engine.model,
            usage=usage,
        )
        if created and usage is not None and self._ledger is not None:
            await self._ledger.counted(usage)
        log.info(
            "completion served from the cache",
            extra={
                "chat_id": str(chat.id),
                "entry_id": cached.entry_id,
                "score": round(cached.score, 4),
                "seconds": round(time.perf_counter() - received, 4),
            },
        )
        yield Started(chat.id, question.id)
        if cached.text:
            yield Delta(cached.text)
        yield Finished(FinishReason.STOP, 0, 0, reply.id, cached=True)

    async def _resume(
        self, chat: Chat, question: Message, sampling: SamplingOptions
    ) -> AsyncGenerator[CompletionEvent, None]:
        """A retried message that nothing here is completing: return its stored reply; else, if another
        replica is generating it (its lease runs), wait for that reply; else (the first attempt failed,
        or its replica died and the lease lapsed) generate it now.

        Registered as running before the reply is looked up, so a completion of this message that ended
        earlier here has stored its reply by then, and none can start here meanwhile."""
        reply = await self.leases.reply_or_take(chat.user_id, question.id)
        if reply is not None:
            for event in stored_reply_events(chat.id, question.id, reply):
                yield event
            return
        # Generated here, so counted here; a reply waited for or replayed is the completion of whichever
        # attempt generated it, and counted there.
        engine = self._models.of_chat(chat.model)
        generating = self._generation.run(chat, engine, question, sampling, None, time.perf_counter())
        async with aclosing(self._metered(generating, engine.model)) as events:
            async for event in events:
                yield event

    def _metered(
        self, events: AsyncGenerator[CompletionEvent, None], model: str
    ) -> AsyncGenerator[CompletionEvent, None]:
        """`events` of one completion by `model`, counted in the metrics by how it ended."""
        return with_outcome_metric(events, self._metrics, model)

    async def list_chats(self, user_id: str, limit: int, after: ChatCursor | None) -> Sequence[Chat]:
        return await self._store.list_chats(user_id, limit, after)

    async def messages(
        self, user_id: str, chat_id: uuid.UUID, limit: int, after_seq: int | None
    ) -> Sequence[Message]:
        return await self._store.messages_page(user_id, chat_id, limit, after_seq)

    async def update_chat(self, user_id: str, chat_id: uuid.UUID, update: ChatUpdate) -> Chat:
        """Apply `update`. A new model is a served one's name ("": the default), stored as the name it
        resolves to; one not served is `NotFound` naming the served ones, and nothing changes. The chat's
        next turn goes to it, with the whole history (as the chat's history strategy sends it)."""
        if update.model is not None:
            update = dataclasses.replace(update, model=self._models.resolve(update.model).model)
        return await self._store.update_chat(user_id, chat_id, update)

    async def delete_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        """Delete a chat, its messages and the answers it left in the cache."""
        await self._store.delete_chat(user_id, chat_id)
        await self._cache.cache.forget_chat(user_id, chat_id)

    async def clear_cache(self, user_id: str) -> int:
        """Delete every cached answer `user_id` stored; returns how many."""
        return await self._cache.cache.clear(user_id)

    # -- what asynchronous jobs need ---------------------------------------------------------------------

    async def admit(self, user_id: str) -> None:
        """`BudgetExhausted` (ResourceExhausted) when a budget of the user is used up: a job is checked
        when it is submitted (its worker answers what was admitted)."""
        if self._ledger is not None:
            await self._ledger.admit(user_id)

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
                    turn.chat,
                    turn.message,
                    sampling,
                    turn.history,
                    time.perf_counter(),
                    use_cache,
                    kind=UsageKind.JOB,
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
