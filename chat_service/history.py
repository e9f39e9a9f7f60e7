"""History strategies: turning a chat's stored messages into the message list sent to the engine."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass

from chat_service.accounting.ledger import Ledger
from chat_service.accounting.values import UsageEntry, UsageKind, UsageOutcome
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


STORED_COUNT_SLACK = 4
"""How many times a message's stored token count may exceed its tokens in the prompt before the window
could drop a turn that would have fit (see `_first_worth_counting`)."""


MARKUP_TOKEN_BOUND = 32
"""More tokens than any prompt template spends on one message's role markup, or on the prompt's own
start and reply cue (a handful for `User:`/`Assistant:`, ChatML or Gemma turn markers)."""


def prompt_token_bound(
    fixed: Sequence[PromptMessage], history: Sequence[Message], limit: int, model: str
) -> int:
    """An upper bound of the prompt's tokens for `model`, judged without the engine (counting stops past
    `limit`).

    A stored user message's count is its count as a whole prompt of its own (so its markup and the
    prompt's start are included), a reply's is the tokens generated, plus a bound on its markup; text
    with no stored count (the system prompt, a summary, a message whose count was never recorded) counts
    one token per UTF-8 byte, which no tokenizer exceeds but for its special tokens (the markup bound).
    A stored count is another model's tokens when the chat changed models since (a reply's is its
    writer's, a question's that of the model that answered it), and another tokenizer may need more:
    such messages, and those whose counting model is not known, count by their bytes too.
    """
    counted_by = {m.reply_to: m.model for m in history if m.reply_to is not None}
    bound = MARKUP_TOKEN_BOUND
    for text in fixed:
        bound += len(text.content.encode()) + MARKUP_TOKEN_BOUND
    for message in history:
        if bound > limit:
            break
        counter = message.model if message.role is Role.ASSISTANT else counted_by.get(message.id)
        if message.token_count <= 0 or counter != model:
            bound += len(message.content.encode()) + MARKUP_TOKEN_BOUND
        elif message.role is Role.USER:
            bound += message.token_count
        else:
            bound += message.token_count + MARKUP_TOKEN_BOUND
    return bound


def surely_fits(fixed: Sequence[PromptMessage], history: Sequence[Message], budget: int, model: str) -> bool:
    """Whether the prompt certainly fits `budget` tokens of `model`. Most turns of most chats are far from
    the context's end, and skip a CountTokens round trip on the way to the first token."""
    return prompt_token_bound(fixed, history, budget, model) <= budget


def as_prompt(message: Message) -> PromptMessage:
    return PromptMessage("user" if message.role is Role.USER else "assistant", message.content)


def _first_worth_counting(history: Sequence[Message], starts: Sequence[int], budget: int) -> int:
    """The oldest turn start worth sending to the engine for counting.

    Stored token counts are close to a message's tokens in the prompt (a user message's count is its
    count as a prompt of its own, a reply's the tokens generated). Once the newer messages' stored counts
    add up to more than `STORED_COUNT_SLACK` times the budget, no older start can fit, so the engine
    need not tokenize those turns: a long chat costs each turn no more than a short one.
    """
    limit = STORED_COUNT_SLACK * max(budget, 0)
    stored_from = 0
    first = starts[-1]
    index = len(history)
    for start in reversed(starts):
        stored_from += sum(m.token_count for m in history[start:index])
        index = start
        if stored_from > limit:
            break
        first = start
    return first


class HistoryBuilder:
    """Builds the prompt for a chat according to its history strategy, for the model that answers it
    (its context, its tokenizer, and the summaries it writes)."""

    def __init__(
        self,
        store: ConversationStore,
        inference: InferenceClient,
        policy: SummaryPolicy,
        ledger: Ledger | None = None,
    ) -> None:
        # Summaries are generations too: with a ledger, each leaves a usage record charged to the chat's
        # owner.
        self._ledger = ledger
        self._store = store
        self._inference = inference
        self._policy = policy

    async def build(
        self, chat: Chat, engine: EngineInfo, history: Sequence[Message], max_tokens: int, request_id: str
    ) -> list[PromptMessage]:
        """The messages to send to `engine` (the chat's model) for the last message of `history` (the
        chat's messages through the new user message, oldest first)."""
        system = [PromptMessage("system", chat.system_prompt)] if chat.system_prompt else []
        if chat.history_strategy is HistoryStrategy.SUMMARY:
            return await self._with_summary(chat, engine, history, system, max_tokens, request_id)
        if chat.history_strategy is HistoryStrategy.WINDOW:
            return await self.fit_window(engine, system, [], history, max_tokens)
        return await self._full(engine, system, history, max_tokens)

    async def _full(
        self, engine: EngineInfo, system: list[PromptMessage], history: Sequence[Message], max_tokens: int
    ) -> list[PromptMessage]:
        """Everything, checked against the context here so that a chat that outgrew it hears what to do
        in the chat API's terms (the engine would name its own API's fields)."""
        prompt = [*system, *map(as_prompt, history)]
        budget = engine.context_length - max_tokens
        if surely_fits(system, history, budget, engine.model):
            return prompt
        counts = await self._inference.count_message_tokens(prompt, model=engine.model)
        if counts.prompt_tokens <= budget:
            return prompt
        question_alone = (
            counts.template_tokens + sum(counts.message_tokens[: len(system)]) + counts.message_tokens[-1]
        )
        if question_alone > budget:
            raise _question_too_long(engine, question_alone, budget, max_tokens)
        room = engine.context_length - counts.prompt_tokens
        raise InvalidArgument(
            "history_strategy",
            f"the chat's history needs {counts.prompt_tokens} prompt tokens, but only {budget} fit the"
            f" model's {engine.context_length}-token context with max_tokens={max_tokens}, and the"
            " chat's history_strategy HISTORY_STRATEGY_FULL sends all of it; switch the chat to"
            " HISTORY_STRATEGY_WINDOW or HISTORY_STRATEGY_SUMMARY (UpdateChat) so that older turns make"
            " room"
            + (f", or lower max_tokens to {room} or less" if room > 0 else "")
            + ", or start a new chat",
        )

    async def fit_window(
        self,
        engine: EngineInfo,
        system: list[PromptMessage],
        preamble: list[PromptMessage],
        history: Sequence[Message],
        max_tokens: int,
    ) -> list[PromptMessage]:
        """Drop the oldest whole turns until system + preamble + history + max_tokens fits `engine`'s
        context.

        At most one CountTokens call whatever the history's length (none when the stored counts prove
        that everything fits): the engine counts each message on its own and reports the counts, so what
        any suffix of the history occupies follows exactly from them. The system prompt, the preamble
        and the new question (the last message) are never dropped.
        """
        budget = engine.context_length - max_tokens
        fixed_messages = [*system, *preamble]
        if surely_fits(fixed_messages, history, budget, engine.model):
            return [*fixed_messages, *map(as_prompt, history)]
        # Where the kept part may begin: the start, or a user message (turns are dropped whole).
        starts = sorted({0, *(i for i, m in enumerate(history) if m.role is Role.USER)})
        first = _first_worth_counting(history, starts, budget)
        sent = history[first:]
        counts = await self._inference.count_message_tokens(
            [*fixed_messages, *map(as_prompt, sent)], model=engine.model
        )
        fixed = counts.template_tokens + sum(counts.message_tokens[: len(fixed_messages)])
        # needed[i]: prompt tokens with sent[i:] kept.
        needed = [fixed] * (len(sent) + 1)
        for i in reversed(range(len(sent))):
            needed[i] = needed[i + 1] + counts.message_tokens[len(fixed_messages) + i]
        start = next((s for s in starts if s >= first and needed[s - first] <= budget), None)
        if start is None:
            raise _question_too_long(engine, needed[starts[-1] - first], budget, max_tokens)
        if start:
            log.info(
                "window dropped old turns",
                extra={"dropped_messages": start, "prompt_tokens": needed[start - first]},
            )
        return [*fixed_messages, *map(as_prompt, history[start:])]

    async def _with_summary(
        self,
        chat: Chat,
        engine: EngineInfo,
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
                summary = await self._summarize(engine, summary, to_fold, request_id, chat)
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
        return await self.fit_window(engine, system, preamble, pending, max_tokens)

    async def _summarize(
        self,
        engine: EngineInfo,
        previous: str | None,
        messages: Sequence[Message],
        request_id: str,
        chat: Chat,
    ) -> str:
        """A summary of `previous` (the summary so far) and `messages`, written by `engine` (the chat's
        model)."""
        lines = [f"Earlier summary: {previous}"] if previous else []
        lines += [f"{'User' if m.role is Role.USER else 'Assistant'}: {m.content}" for m in messages]
        transcript = "\n".join(lines)
        # About 3 characters per token; leave room for the instructions and the summary itself. When the
        # folded turns are longer, keep their beginning and end: names and facts tend to sit there.
        limit = max(2000, (engine.context_length - self._policy.max_tokens - 64) * 3)
        if len(transcript) > limit:
            transcript = f"{transcript[: limit // 3]}\n...\n{transcript[-(limit - limit // 3) :]}"
        prompt = [PromptMessage("system", SUMMARY_INSTRUCTIONS), PromptMessage("user", transcript)]
        pieces: list[str] = []
        generated: Generated | None = None
        async with aclosing(
            self._inference.generate(
                prompt,
                SamplingOptions(max_tokens=self._policy.max_tokens, temperature=0.0),
                f"{request_id}:summary",
                model=engine.model,
            )
        ) as stream:
            async for event in stream:
                if isinstance(event, Generated):
                    generated = event
                else:
                    pieces.append(event)
        if self._ledger is not None and generated is not None:
            await self._ledger.record(
                UsageEntry(
                    user_id=chat.user_id,
                    kind=UsageKind.SUMMARY,
                    model=engine.model,
                    prompt_tokens=generated.prompt_tokens,
                    completion_tokens=generated.completion_tokens,
                    outcome=UsageOutcome(generated.finish_reason.value),
                    chat_id=chat.id,
                    request_key=f"{request_id}:summary:{messages[-1].id}",
                )
            )
        text = "".join(pieces).strip()
        log.info("summarised older turns", extra={"messages": len(messages), "summary_chars": len(text)})
        # An empty summary would silently lose the folded turns; keep (trimmed) text instead.
        return text or transcript


def _question_too_long(
    engine: EngineInfo, prompt_tokens: int, budget: int, max_tokens: int
) -> InvalidArgument:
    return InvalidArgument(
        "content",
        f"the message needs {prompt_tokens} prompt tokens, but only {budget} fit the model's"
        f" ({engine.model}) {engine.context_length}-token context with max_tokens={max_tokens};"
        " shorten the message or the system prompt, or lower max_tokens",
    )
