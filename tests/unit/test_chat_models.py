"""A chat has a model: `ServedModels`, and `Conversations` routing every call of a chat (generation, token
counts, summaries, the window, the semantic cache, metrics, traces) to the chat's model, on in-memory fakes
of the store, the vector index and an inference service serving two models (tests/support/fakes.py). The
real inference service and databases are in tests/integration/test_chat_models.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from chat_service.cache.policy import CachePolicy, SemanticCache
from chat_service.cache.verification import VerificationRule
from chat_service.conversations import CompletionEvent, Conversations, Finished, Started
from chat_service.domain import ChatUpdate, HistoryStrategy, Role
from chat_service.history import HistoryBuilder, SummaryPolicy
from chat_service.inference import EngineInfo, PromptMessage, SamplingOptions, ServedModels
from chat_service.metrics import ChatMetrics
from chat_service.server import wait_for_models
from chatmesh.common.errors import InvalidArgument, NotFound
from tests.support.fakes import FakeEngine, MemoryConversationStore, MemoryVectors
from tests.support.waiting import until

BIG = EngineInfo("big", 4096, 32)
SMALL = EngineInfo("small", 256, 16)
SAMPLING = SamplingOptions(max_tokens=16)


def two_models() -> FakeEngine:
    engine = FakeEngine(models=[BIG, SMALL])
    engine.replies = {"big": ["by big"], "small": ["by small"]}
    engine.token_factor = {"small": 2}  # another tokenizer
    return engine


def conversations(
    store: MemoryConversationStore,
    engine: FakeEngine,
    *,
    vectors: MemoryVectors | None = None,
    metrics: ChatMetrics | None = None,
    strategy: HistoryStrategy = HistoryStrategy.FULL,
) -> Conversations:
    cache = None
    if vectors is not None:
        cache = SemanticCache(vectors, CachePolicy(lookup_timeout_s=60.0), VerificationRule())
    policy = SummaryPolicy(keep_recent_messages=2, min_messages_to_fold=2, max_tokens=8)
    return Conversations(
        store,
        engine,
        HistoryBuilder(store, engine, policy),
        engine.served,
        strategy,
        cache,
        replica_id="replica-a",
        metrics=metrics,
    )


async def drain(events: AsyncGenerator[CompletionEvent, None]) -> list[CompletionEvent]:
    async with aclosing(events):
        return [event async for event in events]


async def new_chat(chats: Conversations, model: str = "", first: str | None = None) -> uuid.UUID:
    events = await drain(chats.create_chat("alice", "", "", None, first, SAMPLING, None, model=model))
    started = events[0]
    assert isinstance(started, Started)
    return started.chat_id


@pytest.fixture
def store() -> MemoryConversationStore:
    return MemoryConversationStore()


# -- ServedModels ------------------------------------------------------------------------------------------


def test_served_models_resolve_by_name_and_the_empty_name_is_the_default() -> None:
    models = ServedModels([BIG, SMALL])
    assert models.default == BIG and models.names == ("big", "small")
    assert models.resolve("") == BIG and models.resolve("small") == SMALL
    assert models.max_context_length == 4096


def test_an_unknown_model_is_not_found_naming_the_served_ones() -> None:
    with pytest.raises(NotFound) as raised:
        ServedModels([BIG, SMALL]).resolve("gpt-5")
    assert "'gpt-5'" in raised.value.message
    assert "'big'" in raised.value.message and "'small'" in raised.value.message


def test_a_chat_whose_model_is_not_served_any_more_is_answered_by_the_default() -> None:
    models = ServedModels([BIG, SMALL])
    assert models.of_chat("") == BIG, "a chat made before chats had models"
    assert models.of_chat("retired") == BIG
    assert models.of_chat("small") == SMALL


def test_served_model_names_are_distinct_and_named() -> None:
    with pytest.raises(ValueError):
        ServedModels([BIG, BIG])
    with pytest.raises(ValueError):
        ServedModels([EngineInfo("", 10, 1)])
    with pytest.raises(ValueError):
        ServedModels([])


async def test_the_service_loads_the_served_models_from_the_inference_service() -> None:
    engine = FakeEngine(models=[SMALL, BIG])
    models = await wait_for_models(engine, timeout_s=5, address="fake")
    assert models.names == ("small", "big") and models.default == SMALL


# -- routing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["big", "small"])
async def test_a_chat_is_answered_by_its_model_which_its_reply_records(
    store: MemoryConversationStore, model: str
) -> None:
    engine = two_models()
    engine.replies[model] = ["by ", model]
    engine.hold_after = 1  # until the question's count is in
    chats = conversations(store, engine)
    creating = asyncio.ensure_future(new_chat(chats, model, first="Say hello."))
    await until(lambda: engine.counted_for != [])
    engine.release.set()
    chat_id = await creating
    chat = await store.get_chat("alice", chat_id)
    assert chat.model == model
    assert [call.model for call in engine.calls] == [model]
    question, reply = await store.history("alice", chat_id)
    assert reply.content == f"by {model}" and reply.model == model
    assert question.model is None
    # The question's count is the answering model's (it bounds the prompts of later turns).
    assert engine.counted_for == [model]
    assert question.token_count == await engine.count_tokens(
        [PromptMessage("user", "Say hello.")], model=model
    )


async def test_a_chat_that_names_no_model_stores_the_default_by_name(store: MemoryConversationStore) -> None:
    chats = conversations(store, two_models())
    chat_id = await new_chat(chats)
    assert (await store.get_chat("alice", chat_id)).model == "big"


async def test_a_chat_on_an_unknown_model_is_not_found_and_nothing_is_stored(
    store: MemoryConversationStore,
) -> None:
    engine = two_models()
    chats = conversations(store, engine)
    with pytest.raises(NotFound, match="'big', 'small'"):
        await new_chat(chats, "nope", first="Hi")
    assert store.db.chats == {} and store.db.messages == {} and engine.calls == []


async def test_a_chat_made_before_chats_had_models_is_answered_by_the_default(
    store: MemoryConversationStore,
) -> None:
    engine = two_models()
    chats = conversations(store, engine)
    chat, _ = await store.create_chat("alice", "", "", HistoryStrategy.FULL)  # model ""
    await drain(chats.complete("alice", chat.id, "Hi", SAMPLING, None))
    assert [call.model for call in engine.calls] == ["big"]
    assert (await store.history("alice", chat.id))[-1].model == "big"


async def test_changing_a_chats_model_sends_the_whole_history_to_the_new_one(
    store: MemoryConversationStore,
) -> None:
    engine = two_models()
    chats = conversations(store, engine)
    chat_id = await new_chat(chats, "big", first="My name is Ada.")
    updated = await chats.update_chat("alice", chat_id, ChatUpdate(model="small"))
    assert updated.model == "small"
    await drain(chats.complete("alice", chat_id, "What is my name?", SAMPLING, None))
    last = engine.calls[-1]
    assert last.model == "small"
    assert [m.content for m in last.messages] == ["My name is Ada.", "by big", "What is my name?"]
    replies = [m for m in await store.history("alice", chat_id) if m.role is Role.ASSISTANT]
    assert [r.model for r in replies] == ["big", "small"]


async def test_changing_to_an_unknown_model_is_not_found_and_changes_nothing(
    store: MemoryConversationStore,
) -> None:
    chats = conversations(store, two_models())
    chat_id = await new_chat(chats, "small")
    with pytest.raises(NotFound, match="'big', 'small'"):
        await chats.update_chat("alice", chat_id, ChatUpdate(model="nope", title="renamed"))
    chat = await store.get_chat("alice", chat_id)
    assert chat.model == "small" and chat.title == ""


async def test_changing_to_the_empty_name_pins_the_default(store: MemoryConversationStore) -> None:
    chats = conversations(store, two_models())
    chat_id = await new_chat(chats, "small")
    assert (await chats.update_chat("alice", chat_id, ChatUpdate(model=""))).model == "big"


async def test_max_tokens_is_checked_against_the_chats_models_context(store: MemoryConversationStore) -> None:
    engine = two_models()
    chats = conversations(store, engine)
    small_chat = await new_chat(chats, "small")
    too_long = SamplingOptions(max_tokens=SMALL.context_length + 1)
    with pytest.raises(InvalidArgument) as raised:
        await drain(chats.complete("alice", small_chat, "Hi", too_long, None))
    assert raised.value.field == "max_tokens" and str(SMALL.context_length) in raised.value.message
    assert engine.calls == []
    big_chat = await new_chat(chats, "big")
    await drain(chats.complete("alice", big_chat, "Hi", too_long, None))
    assert [call.model for call in engine.calls] == ["big"]


async def test_a_reply_gets_its_models_default_length(store: MemoryConversationStore) -> None:
    engine = two_models()
    chats = conversations(store, engine)
    chat_id = await new_chat(chats, "small")
    await drain(chats.complete("alice", chat_id, "Hi", SamplingOptions(), None))
    assert engine.calls[-1].sampling.max_tokens == SMALL.default_max_tokens


async def test_summaries_and_the_window_use_the_chats_model(store: MemoryConversationStore) -> None:
    engine = two_models()
    chats = conversations(store, engine, strategy=HistoryStrategy.SUMMARY)
    chat_id = await new_chat(chats, "small", first="one")
    for text in ("two", "three", "four"):
        await drain(chats.complete("alice", chat_id, text, SAMPLING, None))
    summaries = [call for call in engine.calls if call.request_id.endswith(":summary")]
    assert summaries, "older turns were folded"
    assert {call.model for call in engine.calls} == {"small"}


async def test_a_stored_question_answered_later_goes_to_the_chats_model(
    store: MemoryConversationStore,
) -> None:
    engine = two_models()
    chats = conversations(store, engine)
    chat_id = await new_chat(chats, "small")
    question, _ = await chats.store_question("alice", chat_id, "Hi", "job-1")
    reply = await chats.answer_stored("alice", question.id, SAMPLING, use_cache=False)
    assert reply.model == "small" and [call.model for call in engine.calls] == ["small"]


async def test_a_stateless_answer_goes_to_the_model_it_names(store: MemoryConversationStore) -> None:
    engine = two_models()
    chats = conversations(store, engine)
    prompt = [PromptMessage("user", "Hi")]
    events = await drain(chats.answer("alice", prompt, SAMPLING, "r1", model="small"))
    assert isinstance(events[-1], Finished)
    assert [call.model for call in engine.calls] == ["small"]
    await drain(chats.answer("alice", prompt, SAMPLING, "r2"))
    assert engine.calls[-1].model == "big", "no model: the default"
    with pytest.raises(NotFound):
        chats.answer("alice", prompt, SAMPLING, "r3", model="nope")


# -- the semantic cache ------------------------------------------------------------------------------------


async def test_the_cache_never_serves_one_models_answer_for_another(store: MemoryConversationStore) -> None:
    engine = two_models()
    vectors = MemoryVectors()
    chats = conversations(store, engine, vectors=vectors)
    await new_chat(chats, "big", first="Say hello.")
    await vectors.stored.wait()
    vectors.stored.clear()

    small_chat = await new_chat(chats, "small", first="Say hello.")
    _, reply = await store.history("alice", small_chat)
    assert reply.content == "by small" and reply.model == "small", "not big's cached answer"
    assert [call.model for call in engine.calls] == ["big", "small"]
    await vectors.stored.wait()

    # Each model's answer is there for its own chats, and the reply says which model wrote it.
    again = await drain(chats.create_chat("alice", "", "", None, "Say hello.", SAMPLING, None, model="small"))
    finished = again[-1]
    assert isinstance(finished, Finished) and finished.cached
    assert len(engine.calls) == 2
    started = again[0]
    assert isinstance(started, Started)
    _, cached_reply = await store.history("alice", started.chat_id)
    assert cached_reply.content == "by small" and cached_reply.model == "small"


async def test_a_chat_following_the_default_shares_answers_with_one_naming_it(
    store: MemoryConversationStore,
) -> None:
    engine = two_models()
    vectors = MemoryVectors()
    chats = conversations(store, engine, vectors=vectors)
    old, _ = await store.create_chat("alice", "", "", HistoryStrategy.FULL)  # model "": the default
    await drain(chats.complete("alice", old.id, "Say hello.", SAMPLING, None))
    await vectors.stored.wait()
    events = await drain(chats.create_chat("alice", "", "", None, "Say hello.", SAMPLING, None, model="big"))
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.cached


# -- metrics -----------------------------------------------------------------------------------------------


async def test_completions_are_counted_by_model(store: MemoryConversationStore) -> None:
    registry = CollectorRegistry()
    chats = conversations(store, two_models(), metrics=ChatMetrics(registry))
    await new_chat(chats, "small", first="Hi")
    await new_chat(chats, "big", first="Hi")
    await new_chat(chats, "small", first="Hi")

    def completions(model: str) -> float | None:
        labels = {"outcome": "stop", "cached": "false", "gen_ai_request_model": model}
        return registry.get_sample_value("chatmesh_chat_completions_total", labels)

    assert completions("small") == 2 and completions("big") == 1
    built = registry.get_sample_value(
        "chatmesh_chat_history_strategy_total", {"strategy": "full", "gen_ai_request_model": "small"}
    )
    assert built == 2


# -- traces ------------------------------------------------------------------------------------------------


async def test_the_calls_span_names_the_chats_model(store: MemoryConversationStore) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test")
    chats = conversations(store, two_models())
    for model in ("small", "big"):
        with tracer.start_as_current_span(f"call {model}"):  # the server span of the call
            await new_chat(chats, model, first="Hi")
        prompt = [PromptMessage("user", "Hi")]
        with tracer.start_as_current_span(f"stateless {model}"):
            await drain(chats.answer("alice", prompt, SAMPLING, f"r-{model}", model=model))
    named = {
        span.name: (span.attributes or {}).get("gen_ai.request.model") for span in spans.get_finished_spans()
    }
    assert named == {
        "call small": "small",
        "stateless small": "small",
        "call big": "big",
        "stateless big": "big",
    }
