"""AffinityInferenceClient: a chat's generations on one replica, failover only before streaming."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import pytest

from chat_service.domain import FinishReason
from chat_service.inference import (
    AffinityInferenceClient,
    EngineInfo,
    Generated,
    InferenceClient,
    PromptMessage,
    SamplingOptions,
    TokenCounts,
)
from chatmesh.common.errors import NotFound, ResourceExhausted, Unavailable

PROMPT = [PromptMessage("user", "hi")]


class Replica:
    """A fake engine that streams "a", "b" then finishes, or fails before (or after) its first piece."""

    def __init__(self, name: str, fail: Exception | None = None, fail_after_first: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.fail_after_first = fail_after_first
        self.generated: list[str] = []

    async def list_models(self) -> Sequence[EngineInfo]:
        return [await self.model_info()]

    async def model_info(self, model: str = "") -> EngineInfo:
        if self.fail:
            raise self.fail
        return EngineInfo(self.name, 1024, 16)

    async def count_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> int:
        return 1

    async def count_message_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> TokenCounts:
        return TokenCounts(1, (1,), 0)

    async def generate(
        self,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        *,
        model: str,
        affinity: str | None = None,
    ) -> AsyncGenerator[str | Generated, None]:
        self.generated.append(affinity or request_id)
        if self.fail and not self.fail_after_first:
            raise self.fail
        yield "a"
        if self.fail:
            raise self.fail
        yield "b"
        yield Generated(FinishReason.STOP, 1, 2)


def client(*replicas: Replica) -> AffinityInferenceClient:
    named: list[tuple[str, InferenceClient]] = [(r.name, r) for r in replicas]
    return AffinityInferenceClient(named)


async def drain(engine: AffinityInferenceClient, chat: str) -> list[object]:
    return [
        event async for event in engine.generate(PROMPT, SamplingOptions(), "req", model="", affinity=chat)
    ]


async def test_every_turn_of_a_chat_goes_to_the_same_replica() -> None:
    replicas = [Replica(f"r{i}") for i in range(3)]
    engine = client(*replicas)
    for _ in range(3):
        for chat in ("c1", "c2", "c3", "c4"):
            await drain(engine, chat)
    for chat in ("c1", "c2", "c3", "c4"):
        assert sum(chat in r.generated for r in replicas) == 1, chat


async def test_losing_a_replica_moves_only_its_chats() -> None:
    chats = [f"chat-{i}" for i in range(40)]
    three = client(*(Replica(f"r{i}") for i in range(3)))
    two = client(Replica("r0"), Replica("r1"))
    before = {chat: three.ranked(chat)[0][0] for chat in chats}
    after = {chat: two.ranked(chat)[0][0] for chat in chats}
    assert all(after[chat] == before[chat] for chat in chats if before[chat] != "r2")


@pytest.mark.parametrize(
    "failure", [Unavailable("down"), ResourceExhausted("full", retry_after_s=1), NotFound("no such model")]
)
async def test_a_replica_failing_before_streaming_fails_over(failure: Exception) -> None:
    broken, healthy = Replica("r0", fail=failure), Replica("r1")
    engine = client(broken, healthy)
    # A chat whose first choice is the broken replica.
    chat = next(c for c in (f"c{i}" for i in range(100)) if engine.ranked(c)[0][0] == "r0")
    events = await drain(engine, chat)
    assert events[:2] == ["a", "b"] and isinstance(events[-1], Generated)
    assert broken.generated == [chat] and healthy.generated == [chat]


async def test_a_failure_after_text_streamed_is_not_retried_elsewhere() -> None:
    broken, healthy = Replica("r0", fail=Unavailable("died"), fail_after_first=True), Replica("r1")
    engine = client(broken, healthy)
    chat = next(c for c in (f"c{i}" for i in range(100)) if engine.ranked(c)[0][0] == "r0")
    seen: list[object] = []
    with pytest.raises(Unavailable):
        async for event in engine.generate(PROMPT, SamplingOptions(), "req", model="", affinity=chat):
            seen.append(event)
    assert seen == ["a"] and healthy.generated == [], "the text already sent must not be generated twice"


async def test_every_replica_down_is_the_last_error() -> None:
    engine = client(Replica("r0", fail=Unavailable("down 0")), Replica("r1", fail=Unavailable("down 1")))
    with pytest.raises(Unavailable):
        await drain(engine, "c")
    with pytest.raises(Unavailable):
        await engine.model_info()
