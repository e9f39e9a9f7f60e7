"""The semantic-cache step in front of generation, one for both paths that answer: a chat's completion and
the stateless answer of the OpenAI-compatible API. Look the question up; on a hit serve the cached answer
(each path in its own shape); on a miss generate, and keep a finished answer in the cache after it was
sent. What the cache keys on and whom it serves is the policy's (chat_service/cache/policy.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from opentelemetry import trace

from chat_service.cache.policy import CachedAnswer, NoCache, Question, ResponseCache
from chat_service.conversations.events import CompletionEvent, Delta, Finished
from chat_service.conversations.futures import discard
from chat_service.domain import Chat, FinishReason, Message
from chat_service.inference import PromptMessage


def chat_question(
    chat: Chat, model: str, question: Message, history: Sequence[Message], use_cache: bool
) -> Question | None:
    """`question` of `chat` as the cache sees it, asked of `model` (the chat's, resolved), in the context
    of the turns before it (`history`); None when the caller skips the cache."""
    if not use_cache:
        return None
    return Question(
        user_id=chat.user_id,
        chat_id=chat.id,
        system_prompt=chat.system_prompt,
        earlier_turns=[(m.role.value, m.content) for m in history if m.seq < question.seq],
        text=question.content,
        model=model,
    )


def stateless_question(
    user_id: str, messages: Sequence[PromptMessage], use_cache: bool, model: str
) -> Question | None:
    """The last message of a stateless conversation, asked of `model` (resolved), as the cache sees it:
    the system messages are its system prompt and the other messages before it its earlier turns, as a
    chat's would be."""
    turns = [m for m in messages if m.role != "system"]
    if not use_cache or not turns:
        return None
    return Question(
        user_id=user_id,
        chat_id=None,
        system_prompt="\n\n".join(m.content for m in messages if m.role == "system"),
        earlier_turns=[(m.role, m.content) for m in turns[:-1]],
        text=turns[-1].content,
        model=model,
    )


class CacheStep:
    """The cache in front of an answer. Cache writes run after their answer was sent; they are kept
    here so they are not collected mid-way, and `close` waits for them at shutdown."""

    def __init__(self, cache: ResponseCache | None) -> None:
        self.cache = cache or NoCache()
        self._background: set[asyncio.Task[None]] = set()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Wait (up to `timeout_s`) for cache writes still under way."""
        if self._background:
            await asyncio.wait(self._background, timeout=timeout_s)

    def first_message_lookup(
        self, user_id: str, system_prompt: str, text: str, use_cache: bool, model: str
    ) -> asyncio.Future[CachedAnswer | None] | None:
        """The lookup of a new chat's first message to `model` (resolved), started now: it depends on
        nothing stored (no turns come before it), so it can run while the chat and the message are
        written. `answer` takes it as its `early_lookup`; a caller that does not get that far discards
        it."""
        if not use_cache:
            return None
        question = Question(user_id, None, system_prompt, (), text, model)
        return asyncio.ensure_future(self.cache.lookup(question))

    async def answer(
        self,
        question: Question | None,
        serve: Callable[[CachedAnswer], AsyncGenerator[CompletionEvent, None]],
        generate: Callable[[], AsyncGenerator[CompletionEvent, None]],
        *,
        model: str,
        span_attributes: Mapping[str, str] | None = None,
        early_lookup: asyncio.Future[CachedAnswer | None] | None = None,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """The events of `serve(cached)` when the cache holds a verified answer to `question`, else those
        of `generate()`, whose finished (`stop`) answer is then kept in the cache (never a `length`,
        cancelled or failed one). `model`: the model that answers (the span's `gen_ai.request.model`;
        `question` names it too). `question` None: no lookup, nothing kept. `early_lookup`: the lookup of
        `question` already started (see `first_message_lookup`), used if it has no earlier turns."""
        span = trace.get_current_span()  # the call's server span when tracing is on; else a no-op
        span.set_attributes({**(span_attributes or {}), "gen_ai.request.model": model})
        if question is None:
            discard(early_lookup)
        else:
            if early_lookup is not None and not question.earlier_turns:
                cached = await early_lookup
            else:
                discard(early_lookup)
                cached = await self.cache.lookup(question)
            span.set_attribute("chatmesh.cache.hit", cached is not None)
            if cached is not None:
                async with aclosing(serve(cached)) as events:
                    async for event in events:
                        yield event
                return
        pieces: list[str] = []
        async with aclosing(generate()) as events:
            async for event in events:
                if isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    self._answered(span, question, "".join(pieces), event)
                yield event

    def _answered(self, span: trace.Span, question: Question | None, text: str, finished: Finished) -> None:
        """Record a generated answer on the call's span, and keep it in the cache when it is a finished
        one."""
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": finished.prompt_tokens,
                "gen_ai.usage.output_tokens": finished.completion_tokens,
                "gen_ai.response.finish_reasons": [finished.finish_reason.value],
            }
        )
        if question is not None and finished.finish_reason == FinishReason.STOP:
            self._in_background(self.cache.store(question, text, finished.completion_tokens))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
