"""HistoryBuilder.fit_window with a fake engine whose token count is the number of words."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime

import pytest

from chat_service.domain import Message, Role
from chat_service.history import HistoryBuilder, SummaryPolicy
from chat_service.inference import EngineInfo, Generated, PromptMessage, SamplingOptions
from chatmesh.common.errors import InvalidArgument


class WordCountingEngine:
    def __init__(self) -> None:
        self.counts = 0

    async def model_info(self) -> EngineInfo:
        return EngineInfo("fake", 100, 10)

    async def count_tokens(self, messages: Sequence[PromptMessage]) -> int:
        self.counts += 1
        return sum(len(m.content.split()) + 2 for m in messages)

    async def generate(
        self, messages: Sequence[PromptMessage], sampling: SamplingOptions, request_id: str
    ) -> AsyncGenerator[str | Generated, None]:
        raise AssertionError("fit_window never generates")
        yield ""


def message(seq: int, role: Role, words: int) -> Message:
    return Message(
        id=uuid.uuid4(),
        chat_id=uuid.UUID(int=1),
        user_id="u",
        seq=seq,
        role=role,
        content=" ".join([f"m{seq}"] * words),
        token_count=words + 2,
        finish_reason=None,
        request_id=None,
        reply_to=None,
        created_at=datetime.now(UTC),
    )


def builder(engine: WordCountingEngine) -> HistoryBuilder:
    return HistoryBuilder(None, engine, EngineInfo("fake", 100, 10), SummaryPolicy())  # type: ignore[arg-type]


async def test_keeps_everything_that_fits() -> None:
    engine = WordCountingEngine()
    history = [message(1, Role.USER, 10), message(2, Role.ASSISTANT, 10), message(3, Role.USER, 10)]
    prompt = await builder(engine).fit_window([PromptMessage("system", "be brief")], [], history, 20)
    assert [p.content for p in prompt[1:]] == [m.content for m in history]
    assert engine.counts == 1


async def test_drops_whole_oldest_turns_and_keeps_system_and_question() -> None:
    engine = WordCountingEngine()
    history = [message(i, Role.USER if i % 2 else Role.ASSISTANT, 20) for i in range(1, 8)]
    system = [PromptMessage("system", "be brief")]
    prompt = await builder(engine).fit_window(system, [], history, 30)
    assert prompt[0] == system[0]
    kept = [p.content for p in prompt[1:]]
    assert kept == [m.content for m in history[-len(kept) :]], "a suffix of the history is kept"
    assert prompt[1].role == "user", "turns are dropped whole"
    assert await engine.count_tokens(prompt) + 30 <= 100


async def test_a_question_that_cannot_fit_names_the_content_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        await builder(WordCountingEngine()).fit_window([], [], [message(1, Role.USER, 95)], 10)
    assert err.value.field == "content"
