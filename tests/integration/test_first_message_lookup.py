"""A chat's first message is looked up in the cache while the chat is being stored; a later message after
its turn is stored (its context is the stored history). Conversations on a real SQLite store, with a
recording cache in front of it (the cache itself is tested through the real services elsewhere)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chat_service.cache.policy import CachedAnswer, Question
from chat_service.conversations import Conversations, Finished, Started
from chat_service.domain import HistoryStrategy
from chat_service.history import HistoryBuilder, SummaryPolicy
from chat_service.inference import EngineInfo, SamplingOptions, ServedModels
from chat_service.storage.sql import SqlConversationStore, open_sql_store
from chatmesh.common.errors import ChatmeshError

pytestmark = pytest.mark.integration

ENGINE = EngineInfo("test-model", 2048, 16)


class RecordingStore:
    """The real store, noting when a chat or a turn has been stored."""

    def __init__(self, store: SqlConversationStore, events: list[str]) -> None:
        self._store = store
        self._events = events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def create_chat(self, *args: Any, **kwargs: Any) -> Any:
        created = await self._store.create_chat(*args, **kwargs)
        self._events.append("chat stored")
        return created

    async def start_turn(self, *args: Any, **kwargs: Any) -> Any:
        turn = await self._store.start_turn(*args, **kwargs)
        self._events.append("turn stored")
        return turn


class AnsweringCache:
    """Answers every question from the 'cache', noting when each lookup starts and what it saw."""

    def __init__(self, events: list[str]) -> None:
        self._events = events
        self.questions: list[Question] = []

    async def lookup(self, question: Question) -> CachedAnswer | None:
        self._events.append("lookup started")
        self.questions.append(question)
        return CachedAnswer(str(uuid.uuid4()), f"cached: {question.text}", 3, question.text, 0.99)

    async def store(self, question: Question, answer: str, token_count: int) -> None:
        raise AssertionError("nothing is generated here, so nothing is stored")

    async def forget_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        return None

    async def clear(self, user_id: str) -> int:
        return 0


class NoEngine:
    """Every answer here comes from the cache: any call to the engine is a failure of the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the engine was called ({name}) for a cached answer")


def recording_conversations(
    store: SqlConversationStore, events: list[str], cache: AnsweringCache
) -> Conversations:
    """Conversations over the real store (noting its writes in `events`), `cache`, and no engine."""
    recording: Any = RecordingStore(store, events)
    engine: Any = NoEngine()
    return Conversations(
        recording,
        engine,
        HistoryBuilder(recording, engine, SummaryPolicy()),
        ServedModels([ENGINE]),
        HistoryStrategy.FULL,
        cache,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlConversationStore]:
    async with open_sql_store(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", migrate=True) as store:
        yield store


async def test_a_first_message_is_looked_up_while_its_chat_is_stored(store: SqlConversationStore) -> None:
    events: list[str] = []
    cache = AnsweringCache(events)
    conversations = recording_conversations(store, events, cache)
    sampling = SamplingOptions()

    first = [
        event
        async for event in conversations.create_chat(
            "alice", "", "Be brief.", None, "What is the capital of France?", sampling, None
        )
    ]
    assert events == ["lookup started", "chat stored", "turn stored"]
    started, finished = first[0], first[-1]
    assert isinstance(started, Started) and isinstance(finished, Finished) and finished.cached
    # The early lookup asked in the context the stored chat gives the question: its system prompt, no turns.
    assert cache.questions[0].system_prompt == "Be brief."
    assert cache.questions[0].earlier_turns == ()

    events.clear()
    follow_up = [
        event
        async for event in conversations.complete("alice", started.chat_id, "And of Spain?", sampling, None)
    ]
    assert events == ["turn stored", "lookup started"]
    assert cache.questions[1].chat_id == started.chat_id
    assert cache.questions[1].earlier_turns == [
        ("user", "What is the capital of France?"),
        ("assistant", "cached: What is the capital of France?"),
    ]
    assert isinstance(follow_up[-1], Finished) and follow_up[-1].cached

    # Both answers are in the history, in order.
    history = [(m.role.value, m.content) for m in await store.history("alice", started.chat_id)]
    assert history == [
        ("user", "What is the capital of France?"),
        ("assistant", "cached: What is the capital of France?"),
        ("user", "And of Spain?"),
        ("assistant", "cached: And of Spain?"),
    ]


async def test_skipping_the_cache_looks_nothing_up(store: SqlConversationStore) -> None:
    events: list[str] = []
    cache = AnsweringCache(events)
    conversations = recording_conversations(store, events, cache)
    stream = conversations.create_chat("bob", "", "", None, "Hi?", SamplingOptions(), None, use_cache=False)
    # Not cached, so it goes to the engine, which this test has none of.
    with pytest.raises(ChatmeshError, match="failed unexpectedly"):
        async for _ in stream:
            pass
    assert events == ["chat stored", "turn stored"]
