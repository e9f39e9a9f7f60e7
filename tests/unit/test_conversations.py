"""The conversation logic (`Conversations` and its pieces) on in-memory fakes of the store, the vector index
and the engine (tests/support/fakes.py): turns, retries joining a running completion, a client leaving
mid-stream, cache hits, cross-replica leases, the per-user limit, a refused job submission. Orders of
writes and events only; the waits are on conditions (asyncio events, the fake store's writes), never on
time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pytest

from chat_service.cache.policy import CachePolicy, ResponseCache, SemanticCache
from chat_service.cache.verification import VerificationRule
from chat_service.conversations import CompletionEvent, Conversations, Delta, Failed, Finished, Started
from chat_service.domain import FinishReason, HistoryStrategy, Role
from chat_service.history import HistoryBuilder, SummaryPolicy
from chat_service.inference import PromptMessage, SamplingOptions
from chat_service.jobs.queue import Delivery
from chat_service.jobs.service import Jobs
from chat_service.storage.base import Lease
from chatmesh.common.errors import ResourceExhausted, Unavailable
from tests.support.fakes import (
    FakeEngine,
    MemoryConversationStore,
    MemoryDatabase,
    MemoryJobStore,
    MemoryVectors,
)
from tests.support.waiting import until

SAMPLING = SamplingOptions(max_tokens=16)
REPLY = "Hello, world."


def conversations(
    store: MemoryConversationStore,
    engine: FakeEngine,
    *,
    cache: ResponseCache | None = None,
    replica: str = "replica-a",
    limit: int = 0,
) -> Conversations:
    return Conversations(
        store,
        engine,
        HistoryBuilder(store, engine, SummaryPolicy()),
        engine.served,
        HistoryStrategy.FULL,
        cache,
        replica_id=replica,
        lease_s=60.0,
        # Replica B waits for replica A's reply by polling the store, as it polls the database.
        poll_interval_s=0.001,
        max_completions_per_user=limit,
    )


def semantic_cache(vectors: MemoryVectors) -> SemanticCache:
    return SemanticCache(vectors, CachePolicy(lookup_timeout_s=60.0), VerificationRule())


def describe(event: CompletionEvent) -> str:
    if isinstance(event, Started):
        return "started"
    if isinstance(event, Delta):
        return f"delta {event.text}"
    if isinstance(event, Finished):
        return f"finished {event.finish_reason.value}" + (" cached" if event.cached else "")
    return f"failed {event.error.message}"


async def drain(events: AsyncGenerator[CompletionEvent, None]) -> list[CompletionEvent]:
    async with aclosing(events):
        return [event async for event in events]


def runs_here(chats: Conversations, message_id: uuid.UUID) -> bool:
    """Whether the completion of `message_id` is still registered as running in `chats`' process."""
    return chats.follow_stored(message_id) is not None  # a follower never started leaves no trace


@pytest.fixture
def store() -> MemoryConversationStore:
    return MemoryConversationStore()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


async def new_chat(store: MemoryConversationStore, user: str = "alice", system_prompt: str = "") -> uuid.UUID:
    chat, _ = await store.create_chat(user, "", system_prompt, HistoryStrategy.FULL)
    return chat.id


async def test_a_turn_stores_the_question_then_streams_then_stores_the_reply(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    chats = conversations(store, engine)
    chat_id = await new_chat(store)
    log = store.db.log
    log.clear()
    async with aclosing(chats.complete("alice", chat_id, "Say hello.", SAMPLING, "req-1")) as stream:
        async for event in stream:
            log.append(describe(event))
    # The completion runs in a task of its own, so the follower reads its events when it gets to them:
    # the writes and the events are each in order, the question stored before the first event and the
    # reply before the last.
    writes = [entry for entry in log if entry.startswith(("question", "reply"))]
    events = [entry for entry in log if entry not in writes]
    assert writes == ["question Say hello.", f"reply {REPLY} (stop)"]
    assert events == ["started", "delta Hello", "delta ,", "delta  world", "delta .", "finished stop"]
    assert log.index(writes[0]) < log.index("started")
    assert log.index(writes[1]) < log.index("finished stop")
    question, reply = await store.history("alice", chat_id)
    assert (question.role, reply.role, reply.content, reply.reply_to) == (
        Role.USER,
        Role.ASSISTANT,
        REPLY,
        question.id,
    )
    assert question.token_count == await engine.count_tokens(
        [PromptMessage("user", "Say hello.")], model="fake-model"
    )
    assert [call.messages for call in engine.calls] == [(PromptMessage("user", "Say hello."),)]


async def test_a_retry_joins_the_running_completion_then_replays_the_stored_reply(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    chats = conversations(store, engine)
    chat_id = await new_chat(store)
    engine.hold_after = 2
    first = chats.complete("alice", chat_id, "Say hello.", SAMPLING, "same")
    seen = [await anext(first), await anext(first), await anext(first)]
    assert [describe(e) for e in seen] == ["started", "delta Hello", "delta ,"]
    await engine.holding.wait()

    retry = chats.complete("alice", chat_id, "Say hello.", SAMPLING, "same")
    joined = [await anext(retry) for _ in range(3)]
    assert joined == seen, "the retry sees the running completion's events from the first"
    engine.release.set()
    rest_of_first, rest_of_retry = await drain(first), await drain(retry)
    assert rest_of_first == rest_of_retry
    assert [describe(e) for e in rest_of_first] == ["delta  world", "delta .", "finished stop"]
    assert len(engine.calls) == 1, "generated once"

    # Once this process has let go of the finished completion, a retry replays the stored reply.
    question_id = seen[0].user_message_id if isinstance(seen[0], Started) else None
    assert question_id is not None
    await until(lambda: not runs_here(chats, question_id))
    again = await drain(chats.complete("alice", chat_id, "Say hello.", SAMPLING, "same"))
    finished = rest_of_first[-1]
    assert isinstance(finished, Finished)
    assert [describe(e) for e in again] == ["started", f"delta {REPLY}", "finished stop"]
    assert again[-1] == finished, "the stored reply, with the usage it was generated with"
    assert again[0] == seen[0]
    assert len(engine.calls) == 1
    assert len(await store.history("alice", chat_id)) == 2


async def test_a_client_leaving_mid_stream_stores_the_partial_reply_marked_cancelled(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    chats = conversations(store, engine)
    chat_id = await new_chat(store)
    engine.hold_after = 2
    stream = chats.complete("alice", chat_id, "Say hello.", SAMPLING, "leave")
    started = await anext(stream)
    assert isinstance(started, Started)
    assert [describe(await anext(stream)) for _ in range(2)] == ["delta Hello", "delta ,"]
    await engine.holding.wait()
    await stream.aclose()
    # Once the call has ended, the partial reply is stored and the engine's stream is closed.
    assert store.db.log[-1] == "reply Hello, (cancelled)"
    assert engine.closed == [str(started.user_message_id)]
    question, reply = await store.history("alice", chat_id)
    assert (reply.content, reply.finish_reason, reply.token_count) == ("Hello,", FinishReason.CANCELLED, 2)
    assert question.token_count > 0, "the question's count is stored with the partial reply"

    retried = await drain(chats.complete("alice", chat_id, "Say hello.", SAMPLING, "leave"))
    assert [describe(e) for e in retried] == ["started", "delta Hello,", "finished cancelled"]
    assert len(engine.calls) == 1, "the retry did not generate again"


async def test_a_joined_completion_outlives_its_first_caller(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    chats = conversations(store, engine)
    chat_id = await new_chat(store)
    engine.hold_after = 1
    first = chats.complete("alice", chat_id, "Say hello.", SAMPLING, "outlive")
    await anext(first)
    retry = chats.complete("alice", chat_id, "Say hello.", SAMPLING, "outlive")
    await anext(retry)
    await first.aclose()
    engine.release.set()
    rest = await drain(retry)
    assert [describe(e) for e in rest][-1] == "finished stop", "not cut short by the first caller leaving"
    assert engine.closed == []
    assert (await store.history("alice", chat_id))[1].content == REPLY


async def test_an_engine_failure_mid_stream_is_one_failed_event_then_the_error(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    chats = conversations(store, engine)
    chat_id = await new_chat(store)
    engine.fail, engine.fail_after = Unavailable("the engine went away"), 2
    events: list[str] = []
    with pytest.raises(Unavailable, match="generation failed: the engine went away"):
        async for event in chats.complete("alice", chat_id, "Say hello.", SAMPLING, "fails"):
            events.append(describe(event))
    assert events == [
        "started",
        "delta Hello",
        "delta ,",
        "failed generation failed: the engine went away",
    ]
    (question,) = await store.history("alice", chat_id)
    assert question.token_count > 0, "the question stays, counted; no half reply is stored"
    assert question.id not in store.db.leases, "the lease is released for a retry anywhere"

    engine.fail = None
    await until(lambda: not runs_here(chats, question.id))
    retried = await drain(chats.complete("alice", chat_id, "Say hello.", SAMPLING, "fails"))
    assert [describe(e) for e in retried][-1] == "finished stop"
    assert len(engine.calls) == 2, "the retry generated the reply the failure did not"


async def test_an_engine_refusal_before_the_stream_has_no_event(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    chats = conversations(store, engine)
    chat_id = await new_chat(store)
    engine.fail = ResourceExhausted("the engine is busy", 1.0)
    stream = chats.complete("alice", chat_id, "Say hello.", SAMPLING, None)
    with pytest.raises(ResourceExhausted):
        await anext(stream)
    assert [m.role for m in await store.history("alice", chat_id)] == [Role.USER]


async def test_a_cache_hit_is_served_without_the_engine_and_only_to_its_user(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    vectors = MemoryVectors()
    chats = conversations(store, engine, cache=semantic_cache(vectors))
    first_chat = await new_chat(store)
    generated = await drain(chats.complete("alice", first_chat, "Say hello.", SAMPLING, None))
    assert not isinstance(generated[-1], Finished) or not generated[-1].cached
    await vectors.stored.wait()  # the answer is kept after it was sent

    second_chat = await new_chat(store)
    store.db.log.clear()
    cached = await drain(chats.complete("alice", second_chat, "Say hello.", SAMPLING, None))
    assert [describe(e) for e in cached] == ["started", f"delta {REPLY}", "finished stop cached"]
    assert store.db.log == ["question Say hello.", f"reply {REPLY} (stop)"], "stored like any answer"
    assert len(engine.calls) == 1, "the cached answer did not call the engine"

    bobs_chat = await new_chat(store, "bob")
    bobs = await drain(chats.complete("bob", bobs_chat, "Say hello.", SAMPLING, None))
    assert [describe(e) for e in bobs][-1] == "finished stop", "another user's answer is not served"
    assert len(engine.calls) == 2

    uncached = await drain(
        chats.complete("alice", second_chat, "Say hello.", SAMPLING, None, use_cache=False)
    )
    assert [describe(e) for e in uncached][-1] == "finished stop"
    assert len(engine.calls) == 3
    await chats.close()


async def test_a_chats_first_message_can_be_answered_from_the_cache(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    vectors = MemoryVectors()
    chats = conversations(store, engine, cache=semantic_cache(vectors))
    await drain(chats.create_chat("alice", "", "Be brief.", None, "Say hello.", SAMPLING, None))
    await vectors.stored.wait()
    events = await drain(chats.create_chat("alice", "", "Be brief.", None, "Say hello.", SAMPLING, None))
    first = events[0]
    assert isinstance(first, Started) and first.chat is not None
    assert [describe(e) for e in events] == ["started", f"delta {REPLY}", "finished stop cached"]
    assert len(engine.calls) == 1
    await chats.close()


async def test_a_retry_on_another_replica_waits_for_the_lease_holders_reply(engine: FakeEngine) -> None:
    database = MemoryDatabase()
    store_a, store_b = MemoryConversationStore(database), MemoryConversationStore(database)
    replica_a = conversations(store_a, engine, replica="replica-a")
    replica_b = conversations(store_b, engine, replica="replica-b")
    chat_id = await new_chat(store_a)
    engine.hold_after = 2
    first = replica_a.complete("alice", chat_id, "Say hello.", SAMPLING, "across")
    await anext(first)
    await engine.holding.wait()

    retry = replica_b.complete("alice", chat_id, "Say hello.", SAMPLING, "across")
    waiting = asyncio.ensure_future(drain(retry))
    # B finds A's lease, and generates nothing while A runs.
    await database.wait_until(lambda: any(holder == "replica-b" for _, holder in database.refused_leases))
    assert len(engine.calls) == 1 and not waiting.done()
    engine.release.set()
    from_a = await drain(first)
    from_b = await waiting
    assert len(engine.calls) == 1, "generated once, by the lease holder"
    assert isinstance(from_a[-1], Finished) and from_b[-1] == from_a[-1]
    assert [describe(e) for e in from_b] == ["started", f"delta {REPLY}", "finished stop"]


async def test_a_retry_takes_over_a_lapsed_lease(store: MemoryConversationStore, engine: FakeEngine) -> None:
    chats = conversations(store, engine, replica="replica-b")
    chat_id = await new_chat(store)
    # What a replica that died mid-stream left: the question, under a lease that has run out.
    await store.start_turn("alice", chat_id, "Say hello.", "dead", lease=Lease("replica-a", -1))
    events = await drain(chats.complete("alice", chat_id, "Say hello.", SAMPLING, "dead"))
    assert [describe(e) for e in events][-1] == "finished stop"
    assert len(engine.calls) == 1


async def test_the_per_user_limit_refuses_before_storing_and_frees_at_the_end(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    chats = conversations(store, engine, limit=1)
    chat_id = await new_chat(store)
    engine.hold_after = 1
    running = chats.complete("alice", chat_id, "Say hello.", SAMPLING, "held")
    await anext(running)
    await engine.holding.wait()

    with pytest.raises(ResourceExhausted, match="too many completions at once"):
        await anext(chats.complete("alice", chat_id, "Another?", SAMPLING, None))
    assert [m.content for m in await store.history("alice", chat_id)] == ["Say hello."], "nothing stored"
    retry = chats.complete("alice", chat_id, "Say hello.", SAMPLING, "held")
    assert isinstance(await anext(retry), Started), "a retry shares its first attempt's slot"
    bobs = chats.complete("bob", await new_chat(store, "bob"), "Hi.", SAMPLING, None)
    assert isinstance(await anext(bobs), Started), "another user's limit is their own"

    engine.release.set()
    for stream in (running, retry, bobs):
        assert isinstance((await drain(stream))[-1], Finished)
    after = await drain(chats.complete("alice", chat_id, "Another?", SAMPLING, None))
    assert isinstance(after[-1], Finished), "the slot is free once the completion ended"
    assert not store.db.slots


async def test_a_stateless_answer_stores_nothing_and_shares_the_users_cache(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    vectors = MemoryVectors()
    chats = conversations(store, engine, cache=semantic_cache(vectors))
    messages = [PromptMessage("system", "Be brief."), PromptMessage("user", "Say hello.")]
    events = await drain(chats.answer("alice", messages, SAMPLING, "chatcmpl-1"))
    assert [describe(e) for e in events] == [
        "delta Hello",
        "delta ,",
        "delta  world",
        "delta .",
        "finished stop",
    ]
    assert isinstance(events[-1], Finished) and events[-1].assistant_message_id is None
    assert store.db.log == [] and store.db.messages == {}
    await vectors.stored.wait()
    again = await drain(chats.answer("alice", messages, SAMPLING, "chatcmpl-2"))
    assert [describe(e) for e in again] == [f"delta {REPLY}", "finished stop cached"]
    assert len(engine.calls) == 1
    await drain(chats.answer("bob", messages, SAMPLING, "chatcmpl-3"))
    assert len(engine.calls) == 2, "scoped per user"
    await chats.close()


async def test_jobs_answer_a_stored_question_once(store: MemoryConversationStore, engine: FakeEngine) -> None:
    chats = conversations(store, engine)
    chat_id = await new_chat(store)
    question, created = await chats.store_question("alice", chat_id, "Say hello.", "job-1")
    assert created
    assert chats.follow_stored(question.id) is None, "nothing runs before a worker answers it"
    engine.hold_after = 1
    answering = asyncio.ensure_future(chats.answer_stored("alice", question.id, SAMPLING, use_cache=False))
    await engine.holding.wait()
    watcher = chats.follow_stored(question.id)
    assert watcher is not None
    engine.release.set()
    watched = await drain(watcher)
    reply = await answering
    assert reply.content == REPLY and isinstance(watched[-1], Finished)
    assert watched[-1].assistant_message_id == reply.id
    assert await chats.answer_stored("alice", question.id, SAMPLING, use_cache=False) == reply
    assert len(engine.calls) == 1


async def test_a_failed_event_carries_the_error_the_call_raises(
    store: MemoryConversationStore, engine: FakeEngine
) -> None:
    chats = conversations(store, engine)
    chat_id = await new_chat(store)
    engine.fail, engine.fail_after = Unavailable("down"), 1
    stream = chats.complete("alice", chat_id, "Say hello.", SAMPLING, None)
    events: list[CompletionEvent] = []
    with pytest.raises(Unavailable) as raised:
        async for event in stream:
            events.append(event)
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.error is raised.value


class RecordingQueue:
    """A `JobQueue` that notes the ids it takes, or refuses them all as full (`full`)."""

    max_attempts = 3

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.full = False

    async def submit(self, job_id: str) -> None:
        if self.full:
            raise ResourceExhausted("the job queue is full", 1.0)
        self.submitted.append(job_id)

    async def depth(self) -> int:
        return len(self.submitted)

    async def deliveries(self) -> AsyncGenerator[Delivery, None]:
        raise AssertionError("no worker runs here")
        yield


async def test_a_refused_job_submission_leaves_nothing_stored(engine: FakeEngine) -> None:
    database = MemoryDatabase()
    store = MemoryConversationStore(database)
    queue = RecordingQueue()
    jobs = Jobs(MemoryJobStore(database), queue, conversations(store, engine), max_active_per_user=1)
    chat_id = await new_chat(store)
    first = await jobs.submit("alice", chat_id, "Say hello.", SAMPLING, "job-1", use_cache=False)
    assert queue.submitted == [str(first.job.id)]
    again = await jobs.submit("alice", chat_id, "Say hello.", SAMPLING, "job-1", use_cache=False)
    assert again.job.id == first.job.id, "a retried submission is the same job"

    with pytest.raises(ResourceExhausted, match="too many jobs"):
        await jobs.submit("alice", chat_id, "And again?", SAMPLING, "job-2", use_cache=False)
    queue.full = True
    bobs_chat = await new_chat(store, "bob")
    with pytest.raises(ResourceExhausted, match="full"):
        await jobs.submit("bob", bobs_chat, "Hi?", SAMPLING, None, use_cache=False)
    assert [m.content for m in await store.history("alice", chat_id)] == ["Say hello."]
    assert await store.history("bob", bobs_chat) == []
    assert list(database.jobs) == [first.job.id]
