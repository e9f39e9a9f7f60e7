"""History strategies: turning a chat's stored messages into the message list sent to the engine."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass

from chat_service.domain import Chat, HistoryStrategy, Message, Role
from chat_service.inference import EngineInfo, Generated, InferenceClient, PromptMessage, SamplingOptions
from chat_service.storage.base import ConversationStore
from chatmesh.common.errors import InvalidArgument

log = logging.getLogger(__name__)

SUMMARY_INSTRUCTIONS = (
    "Summarize the conversation below in a few sentences. Keep names, numbers and facts the user gave."
)


@dataclass(frozen=True, slots=True)
class SummaryPolicy:
    """When and how older turns are folded into the summary."""

    keep_recent_messages: int = 4
    """Messages just before the new question that always stay verbatim."""
    min_messages_to_fold: int = 2
    """Older messages are summarised once at least this many are waiting (one user+assistant turn)."""
    max_tokens: int = 160


def as_prompt(message: Message) -> PromptMessage:
    return PromptMessage("user" if message.role is Role.USER else "assistant", message.content)


class HistoryBuilder:
    """Builds the prompt for a chat according to its history strategy."""

    def __init__(
        self, store: ConversationStore, inference: InferenceClient, engine: EngineInfo, policy: SummaryPolicy
    ) -> None:
        self._store = store
        self._inference = inference
        self._engine = engine
        self._policy = policy

    async def build(
        self, chat: Chat, history: Sequence[Message], max_tokens: int, request_id: str
    ) -> list[PromptMessage]:
        """The messages to send for the last message of `history` (the chat's messages through the new
        user message, oldest first)."""
        system = [PromptMessage("system", chat.system_prompt)] if chat.system_prompt else []
        if chat.history_strategy is HistoryStrategy.SUMMARY:
            return await self._with_summary(chat, history, system, max_tokens, request_id)
        if chat.history_strategy is HistoryStrategy.WINDOW:
            return await self.fit_window(system, [], history, max_tokens)
        return [*system, *map(as_prompt, history)]

    async def fit_window(
        self,
        system: list[PromptMessage],
        preamble: list[PromptMessage],
        history: Sequence[Message],
        max_tokens: int,
    ) -> list[PromptMessage]:
        """Drop the oldest turns until system + preamble + history + max_tokens fits the context.

        The stored per-message token counts give a first guess of where to start; the engine's own
        count of the whole prompt has the final word.
        """
        budget = self._engine.context_length - max_tokens
        turn_starts = [i for i, m in enumerate(history) if m.role is Role.USER] or [0]
        # Guess: the earliest turn whose stored counts fit (counts include per-message template overhead,
        # so the guess errs toward dropping a little too much, which the loop below cannot undo; the
        # overhead is a handful of tokens per message).
        remaining = sum(m.token_count for m in history)
        start_index = 0
        fixed = sum(len(p.content) // 4 for p in (*system, *preamble))
        while start_index < len(turn_starts) - 1 and remaining + fixed > budget:
            remaining -= sum(
                m.token_count for m in history[turn_starts[start_index] : turn_starts[start_index + 1]]
            )
            start_index += 1
        while True:
            kept = history[turn_starts[start_index] :]
            candidate = [*system, *preamble, *map(as_prompt, kept)]
            prompt_tokens = await self._inference.count_tokens(candidate)
            if prompt_tokens <= budget:
                if start_index:
                    log.info(
                        "window dropped old turns",
                        extra={"dropped_messages": len(history) - len(kept), "prompt_tokens": prompt_tokens},
                    )
                return candidate
            if start_index >= len(turn_starts) - 1:
                raise InvalidArgument(
                    "content",
                    f"the message needs {prompt_tokens} prompt tokens, but only {budget} fit the model's"
                    f" {self._engine.context_length}-token context with max_tokens={max_tokens};"
                    " shorten the message or the system prompt, or lower max_tokens",
                )
            start_index += 1

    async def _with_summary(
        self,
        chat: Chat,
        history: Sequence[Message],
        system: list[PromptMessage],
        max_tokens: int,
        request_id: str,
    ) -> list[PromptMessage]:
        latest = await self._store.latest_summary(chat.user_id, chat.id)
        summary = latest.summary if latest else None
        pending = [m for m in history if latest is None or m.seq > latest.seq]
        # pending = [older..., recent (keep_recent_messages)..., new question]
        fold_count = len(pending) - 1 - self._policy.keep_recent_messages
        # Fold whole turns only, so the verbatim part starts with a user message.
        while fold_count > 0 and pending[fold_count].role is not Role.USER:
            fold_count -= 1
        if fold_count >= self._policy.min_messages_to_fold:
            to_fold, pending = pending[:fold_count], pending[fold_count:]
            try:
                summary = await self._summarize(summary, to_fold, request_id)
            except InvalidArgument as exc:
                # The turns to fold do not fit the engine even trimmed (dense scripts tokenize to more
                # than ~3 characters per token). Answering matters more: keep the old summary and let the
                # window below drop what does not fit; the next turn tries again.
                log.warning("could not summarise older turns", extra={"error": exc.message})
                pending = [*to_fold, *pending]
            else:
                await self._store.save_summary(chat.user_id, to_fold[-1].id, summary)
        preamble = (
            [PromptMessage("system", f"Summary of the earlier conversation: {summary}")] if summary else []
        )
        # The summary bounds growth, but one long recent turn can still overflow: the window is the backstop.
        return await self.fit_window(system, preamble, pending, max_tokens)

    async def _summarize(self, previous: str | None, messages: Sequence[Message], request_id: str) -> str:
        lines = [f"Earlier summary: {previous}"] if previous else []
        lines += [f"{'User' if m.role is Role.USER else 'Assistant'}: {m.content}" for m in messages]
        transcript = "\n".join(lines)
        # About 3 characters per token; leave room for the instructions and the summary itself. When the
        # folded turns are longer, keep their beginning and end: names and facts tend to sit there.
        limit = max(2000, (self._engine.context_length - self._policy.max_tokens - 64) * 3)
        if len(transcript) > limit:
            transcript = f"{transcript[: limit // 3]}\n...\n{transcript[-(limit - limit // 3) :]}"
        prompt = [PromptMessage("system", SUMMARY_INSTRUCTIONS), PromptMessage("user", transcript)]
        pieces: list[str] = []
        async with aclosing(
            self._inference.generate(
                prompt,
                SamplingOptions(max_tokens=self._policy.max_tokens, temperature=0.0),
                f"{request_id}:summary",
            )
        ) as stream:
            async for event in stream:
                if not isinstance(event, Generated):
                    pieces.append(event)
        text = "".join(pieces).strip()
        log.info("summarised older turns", extra={"messages": len(messages), "summary_chars": len(text)})
        # An empty summary would silently lose the folded turns; keep (trimmed) text instead.
        return text or transcript
