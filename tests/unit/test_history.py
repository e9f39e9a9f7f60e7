"""HistoryBuilder's window and full strategies with a fake engine whose token count is the number of
words: each message is its words plus 2 (role markup), every prompt has 3 more (BOS and the reply cue)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime

import pytest

from chat_service.domain import Chat, HistoryStrategy, Message, Role
from chat_service.history import (
    MARKUP_TOKEN_BOUND,
    STORED_COUNT_SLACK,
    HistoryBuilder,
    SummaryPolicy,
    as_prompt,
    prompt_token_bound,
)
from chat_service.inference import EngineInfo, Generated, PromptMessage, SamplingOptions, TokenCounts
from chatmesh.common.errors import InvalidArgument

CONTEXT = 100
TEMPLATE_TOKENS = 3
ENGINE = EngineInfo("fake", CONTEXT, 10)


def tokens(message: PromptMessage) -> int:
    return len(message.content.split()) + 2


class WordCountingEngine:
    def __init__(self) -> None:
        self.calls: list[list[PromptMessage]] = []

    async def list_models(self) -> Sequence[EngineInfo]:
        return [ENGINE]

    async def model_info(self, model: str = "") -> EngineInfo:
        return ENGINE

    async def count_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> int:
        return (await self.count_message_tokens(messages, model=model)).prompt_tokens

    async def count_message_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> TokenCounts:
        assert model == ENGINE.model, "counts are the chat's model's"
        self.calls.append(list(messages))
        per_message = tuple(tokens(m) for m in messages)
        return TokenCounts(TEMPLATE_TOKENS + sum(per_message), per_message, TEMPLATE_TOKENS)

    async def generate(
        self,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        *,
        model: str,
        affinity: str | None = None,
    ) -> AsyncGenerator[str | Generated, None]:
        raise AssertionError("the window and full strategies never generate")
        yield ""


def message(
    seq: int,
    role: Role,
    words: int,
    token_count: int | None = None,
    *,
    reply_to: uuid.UUID | None = None,
    model: str = "fake",
) -> Message:
    """A stored message; a reply is `model`'s (whose tokens its count is)."""
    return Message(
        id=uuid.uuid4(),
        chat_id=uuid.UUID(int=1),
        user_id="u",
        seq=seq,
        role=role,
        content=" ".join([f"m{seq}"] * words),
        # What the store keeps: about the message's tokens in the prompt.
        token_count=words + 2 if token_count is None else token_count,
        finish_reason=None,
        request_id=None,
        reply_to=reply_to,
        created_at=datetime.now(UTC),
        model=model if role is Role.ASSISTANT else None,
    )


def turns(count: int, words: int, model: str = "fake") -> list[Message]:
    """`count` user+assistant turns by `model`, then the new question: 2 * count + 1 messages."""
    history: list[Message] = []
    for i in range(1, 2 * count + 2):
        role = Role.USER if i % 2 else Role.ASSISTANT
        question = history[-1].id if role is Role.ASSISTANT else None
        history.append(message(i, role, words, reply_to=question, model=model))
    return history


class Window:
    """`HistoryBuilder.fit_window` for `ENGINE`, as the tests call it."""

    def __init__(self, engine: WordCountingEngine, info: EngineInfo = ENGINE) -> None:
        self._builder = HistoryBuilder(None, engine, SummaryPolicy())  # type: ignore[arg-type]
        self._info = info

    async def fit_window(
        self,
        system: list[PromptMessage],
        preamble: list[PromptMessage],
        history: Sequence[Message],
        max_tokens: int,
    ) -> list[PromptMessage]:
        return await self._builder.fit_window(self._info, system, preamble, history, max_tokens)

    async def build(
        self, chat: Chat, history: Sequence[Message], max_tokens: int, request_id: str
    ) -> list[PromptMessage]:
        return await self._builder.build(chat, self._info, history, max_tokens, request_id)


def builder(engine: WordCountingEngine) -> Window:
    return Window(engine)


def chat(strategy: HistoryStrategy, system_prompt: str = "be brief") -> Chat:
    now = datetime.now(UTC)
    return Chat(uuid.UUID(int=1), "u", "t", system_prompt, strategy, now, now, "fake")


def prompt_tokens(prompt: Sequence[PromptMessage]) -> int:
    return TEMPLATE_TOKENS + sum(map(tokens, prompt))


async def test_keeps_everything_that_fits_with_one_count() -> None:
    engine = WordCountingEngine()
    history = [message(1, Role.USER, 10), message(2, Role.ASSISTANT, 10), message(3, Role.USER, 10)]
    prompt = await builder(engine).fit_window([PromptMessage("system", "be brief")], [], history, 20)
    assert [p.content for p in prompt[1:]] == [m.content for m in history]
    assert len(engine.calls) == 1


async def test_drops_whole_oldest_turns_and_keeps_system_and_question() -> None:
    engine = WordCountingEngine()
    history = [message(i, Role.USER if i % 2 else Role.ASSISTANT, 20) for i in range(1, 8)]
    system = [PromptMessage("system", "be brief")]
    prompt = await builder(engine).fit_window(system, [], history, 30)
    assert prompt[0] == system[0]
    kept = [p.content for p in prompt[1:]]
    assert kept == [m.content for m in history[-len(kept) :]], "a suffix of the history is kept"
    assert prompt[1].role == "user", "turns are dropped whole"
    assert prompt_tokens(prompt) + 30 <= CONTEXT


async def test_the_window_is_exact_and_takes_one_count_whatever_the_history_length() -> None:
    for count in (1, 5, 40, 300):
        engine = WordCountingEngine()
        history = turns(count, words=3)
        system = [PromptMessage("system", "be brief")]
        prompt = await builder(engine).fit_window(system, [], history, 20)
        assert len(engine.calls) == 1, f"{count} turns: one CountTokens call"
        kept = len(prompt) - 1
        assert prompt_tokens(prompt) + 20 <= CONTEXT
        if kept < len(history):
            # Exact: keeping one more turn would not fit.
            one_more = [*system, *(PromptMessage("user", m.content) for m in history[-kept - 2 :])]
            assert prompt_tokens(one_more) + 20 > CONTEXT, f"{count} turns: dropped a turn that fit"


async def test_a_long_history_is_not_all_sent_for_counting() -> None:
    engine = WordCountingEngine()
    history = turns(2000, words=3)
    prompt = await builder(engine).fit_window([], [], history, 20)
    budget = CONTEXT - 20
    (sent,) = engine.calls
    # Only what stored counts say could matter: about STORED_COUNT_SLACK budgets' worth, a turn more.
    assert sum(map(tokens, sent)) <= STORED_COUNT_SLACK * budget + 2 * tokens(sent[0])
    assert prompt == sent[-len(prompt) :]


async def test_overstated_stored_counts_never_cost_a_turn_that_fits() -> None:
    engine = WordCountingEngine()
    # Stored counts up to STORED_COUNT_SLACK times the real ones still give the exact window.
    history = [
        message(i, Role.USER if i % 2 else Role.ASSISTANT, 3, token_count=STORED_COUNT_SLACK * 5)
        for i in range(1, 60)
    ]
    exact = await builder(WordCountingEngine()).fit_window([], [], turns(29, words=3), 20)
    prompt = await builder(engine).fit_window([], [], history, 20)
    assert len(prompt) == len(exact)


async def test_a_leading_reply_is_kept_when_everything_fits() -> None:
    history = [message(1, Role.ASSISTANT, 3), message(2, Role.USER, 3)]
    prompt = await builder(WordCountingEngine()).fit_window([], [], history, 20)
    assert [p.role for p in prompt] == ["assistant", "user"]


async def test_a_question_that_cannot_fit_names_the_content_field() -> None:
    engine = WordCountingEngine()
    history = [*turns(10, words=3), message(99, Role.USER, 95)]
    with pytest.raises(InvalidArgument) as err:
        await builder(engine).fit_window([], [], history, 10)
    assert err.value.field == "content"
    assert "shorten the message" in err.value.message
    assert len(engine.calls) == 1


async def test_full_sends_everything_that_fits_with_one_count() -> None:
    engine = WordCountingEngine()
    history = turns(3, words=3)
    prompt = await builder(engine).build(chat(HistoryStrategy.FULL), history, 20, "r")
    assert [p.content for p in prompt] == ["be brief", *(m.content for m in history)]
    assert len(engine.calls) == 1


async def test_full_with_an_over_long_history_says_what_to_change_in_chat_terms() -> None:
    engine = WordCountingEngine()
    history = turns(12, words=3)  # 25 messages of 5 tokens: 125 + template > the 100-token context
    with pytest.raises(InvalidArgument) as err:
        await builder(engine).build(chat(HistoryStrategy.FULL), history, 20, "r")
    assert err.value.field == "history_strategy"
    assert "HISTORY_STRATEGY_WINDOW" in err.value.message
    assert "max_tokens" in err.value.message
    assert "messages" not in err.value.message, "no inference API field names"


async def test_full_with_a_question_that_cannot_fit_names_the_content_field() -> None:
    history = [message(1, Role.USER, 95)]
    with pytest.raises(InvalidArgument) as err:
        await builder(WordCountingEngine()).build(chat(HistoryStrategy.FULL), history, 10, "r")
    assert err.value.field == "content"


@pytest.mark.parametrize("strategy", [HistoryStrategy.FULL, HistoryStrategy.WINDOW])
async def test_a_chat_far_from_the_context_end_is_sent_whole_without_counting(
    strategy: HistoryStrategy,
) -> None:
    engine = WordCountingEngine()
    history = turns(2, 3)
    roomy = Window(engine, EngineInfo("fake", 4096, 10))
    prompt = await roomy.build(chat(strategy), history, max_tokens=100, request_id="r")
    assert prompt == [PromptMessage("system", "be brief"), *map(as_prompt, history)]
    assert engine.calls == [], "the stored counts prove it fits: no CountTokens round trip"


def test_the_bound_counts_bytes_for_text_without_a_stored_count() -> None:
    uncounted = message(1, Role.USER, 5, token_count=0)
    counted = message(2, Role.ASSISTANT, 5, token_count=7)
    system = [PromptMessage("system", "héllo")]
    bound = prompt_token_bound(system, [uncounted, counted], limit=10_000, model="fake")
    markup = MARKUP_TOKEN_BOUND
    assert bound == markup + (len("héllo".encode()) + markup) + (len(uncounted.content) + markup) + 7 + markup


def test_the_bound_counts_bytes_for_counts_of_another_model() -> None:
    """After a chat changed models, its stored counts are another tokenizer's, which may need fewer
    tokens than the chat's model now: a reply by another model, and a question that model answered
    (its count is that model's), count by their bytes; the current model's turns by their counts."""
    other = turns(1, words=5, model="other")[:2]
    own = turns(1, words=5)[:2]
    history = [*other, *own]
    bound = prompt_token_bound([], history, limit=10_000, model="fake")
    by_bytes = sum(len(m.content.encode()) + MARKUP_TOKEN_BOUND for m in other)
    by_counts = own[0].token_count + own[1].token_count + MARKUP_TOKEN_BOUND
    assert bound == MARKUP_TOKEN_BOUND + by_bytes + by_counts
