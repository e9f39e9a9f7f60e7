"""The semantic cache through the real chat service over gRPC: the real embedding model and vector
service (qdrant-client's local mode) in the embedding service, the session's engine behind a recording
proxy (so a test can tell a cached answer from a generated one), SQLite for the history.

Every chat service here uses its own collection, so the tests share the session's embedding service
without seeing each other's entries.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from chat_service.cache.policy import GLOBAL_SCOPE
from chatmesh.chat.v1 import chat_pb2 as pb
from embedding_service.qdrant_index import partition_name
from tests.support.chat import ChatClient
from tests.support.processes import LoggedProcess, log_entries
from tests.support.recording_proxy import RecordingInferenceProxy, run_recording_proxy
from tests.support.services import cache_entries
from tests.support.stack import chat_service
from tests.support.stack import embedding_service as start_embedding_service
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
PARAPHRASE = "What's the capital of France?"
"""The base model answers QUESTION with a short sentence that ends on its own (`stop`)."""


@dataclass
class CacheStack:
    """A chat service with the semantic cache on, and what it talks to."""

    address: str
    engine: RecordingInferenceProxy
    vectors: str
    collection: str
    process: LoggedProcess

    def generated(self) -> list[str]:
        """The last user message of every reply the engine was asked to generate."""
        return [r.messages[-1].content for r in self.engine.chat_requests()]

    async def entries(self, where: dict[str, str]) -> int:
        """How many cache entries match `where` (read straight from the vector service)."""
        return await cache_entries(self.vectors, self.collection, where)


@contextmanager
def cache_stack(
    tmp_path: Path, inference_address: str, vectors: str, **settings: Any
) -> Iterator[CacheStack]:
    """A chat service (SQLite in `tmp_path`) with the cache on the vector service at `vectors`, in a
    collection of its own, generating through a recording proxy in front of `inference_address`."""
    collection = f"answers_{uuid.uuid4().hex[:12]}"
    database = f"sqlite+aiosqlite:///{tmp_path / f'{collection}.db'}"
    with (
        run_recording_proxy(inference_address) as (engine_address, recorder),
        chat_service(
            database,
            engine_address,
            cache_address=vectors,
            cache_collection=collection,
            # Generous: a lookup on a busy test machine must not turn a hit into a miss. The default
            # budget (50 ms) is measured in benchmarks/cache_speed.py, not here.
            cache_lookup_timeout_s=10,
            **settings,
        ) as chat,
    ):
        yield CacheStack(chat.address, recorder, vectors, collection, chat.process)


@pytest.fixture
def stack(
    tmp_path: Path, inference_address: str, embedding_service: tuple[str, LoggedProcess]
) -> Iterator[CacheStack]:
    with cache_stack(tmp_path, inference_address, embedding_service[0]) as running:
        yield running


@pytest.fixture
async def channel(stack: CacheStack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        yield channel


async def stored(stack: CacheStack, where: dict[str, str], count: int) -> None:
    """Wait until `count` entries match `where` (answers are stored just after they are sent)."""

    async def matches() -> bool:
        return await stack.entries(where) == count

    await eventually(matches, f"{count} cache entries never matched {where}")


async def test_a_paraphrase_from_the_same_user_is_served_from_the_cache(
    stack: CacheStack, channel: grpc.aio.Channel
) -> None:
    alice = ChatClient(channel)
    first = await alice.create(QUESTION, max_tokens=48, temperature=0)
    assert first.last is not None and first.last.finish_reason == pb.FINISH_REASON_STOP, first.last
    assert not first.last.cached and first.text
    await stored(stack, {"owner": alice.user}, 1)
    stack.engine.clear()

    second = await alice.create(PARAPHRASE, max_tokens=48, temperature=0)
    assert second.last is not None and second.last.cached, "served from the cache"
    assert second.text == first.text
    assert second.last.usage.completion_tokens == 0, "nothing was generated"
    assert second.last.finish_reason == pb.FINISH_REASON_STOP and second.last.assistant_message_id
    assert stack.generated() == [], "the engine was not asked"
    history = await alice.all_messages(second.chat_id)
    assert [(m.role, m.content) for m in history] == [
        (pb.ROLE_USER, PARAPHRASE),
        (pb.ROLE_ASSISTANT, first.text),
    ], "a cached answer is stored in the history like any other"
    assert history[1].message_id == second.last.assistant_message_id


async def test_another_user_asking_the_same_question_gets_a_generated_answer(
    stack: CacheStack, channel: grpc.aio.Channel
) -> None:
    alice, bob = ChatClient(channel), ChatClient(channel)
    await alice.create(QUESTION, max_tokens=48, temperature=0)
    await stored(stack, {"owner": alice.user}, 1)
    stack.engine.clear()
    answer = await bob.create(QUESTION, max_tokens=48, temperature=0)
    assert answer.last is not None and not answer.last.cached
    assert stack.generated() == [QUESTION], "bob's answer was generated for bob"


async def test_a_follow_up_hits_only_after_the_very_same_conversation(
    stack: CacheStack, channel: grpc.aio.Channel
) -> None:
    alice = ChatClient(channel)
    first = await alice.create("What is 2 plus 2?", max_tokens=48, temperature=0)
    follow_up = await alice.complete(first.chat_id, "Say hello.", max_tokens=48, temperature=0)
    assert follow_up.last is not None and follow_up.last.finish_reason == pb.FINISH_REASON_STOP
    await stored(stack, {"owner": alice.user}, 2)

    # The same follow-up after another first question: another context, so never its answer.
    other = await alice.create(QUESTION, max_tokens=48, temperature=0)
    stack.engine.clear()
    elsewhere = await alice.complete(other.chat_id, "Say hello.", max_tokens=48, temperature=0)
    assert elsewhere.last is not None and not elsewhere.last.cached
    assert stack.generated() == ["Say hello."]

    # After the same first exchange (itself from the cache), the follow-up's answer may be served.
    again = await alice.create("What is 2 plus 2?", max_tokens=48, temperature=0)
    assert again.last is not None and again.last.cached
    repeated = await alice.complete(again.chat_id, "Say hello.", max_tokens=48, temperature=0)
    assert repeated.last is not None and repeated.last.cached and repeated.text == follow_up.text


async def test_skip_cache_neither_looks_up_nor_stores(stack: CacheStack, channel: grpc.aio.Channel) -> None:
    alice = ChatClient(channel)
    skipped = await alice.create(QUESTION, max_tokens=48, temperature=0, skip_cache=True)
    assert skipped.last is not None and skipped.last.finish_reason == pb.FINISH_REASON_STOP
    # Stored by then, had it been stored: the store is decided as the reply ends, before this request.
    await alice.create("Say hello.", max_tokens=48, temperature=0)
    await stored(stack, {"owner": alice.user}, 1)
    assert await stack.entries({"owner": alice.user, "question": QUESTION}) == 0

    await alice.create(QUESTION, max_tokens=48, temperature=0)
    await stored(stack, {"owner": alice.user, "question": QUESTION}, 1)
    stack.engine.clear()
    fresh = await alice.create(QUESTION, max_tokens=48, temperature=0, skip_cache=True)
    assert fresh.last is not None and not fresh.last.cached
    assert stack.generated() == [QUESTION], "with skip_cache the model answers even on a would-be hit"


async def test_an_answer_cut_at_max_tokens_is_not_stored(
    stack: CacheStack, channel: grpc.aio.Channel
) -> None:
    alice = ChatClient(channel)
    cut = await alice.create(QUESTION, max_tokens=2, temperature=0)
    assert cut.last is not None and cut.last.finish_reason == pb.FINISH_REASON_LENGTH
    await alice.create("Say hello.", max_tokens=48, temperature=0)
    await stored(stack, {"owner": alice.user}, 1)
    assert await stack.entries({"owner": alice.user, "chat_id": cut.chat_id}) == 0


async def test_deleting_a_chat_deletes_its_entries(stack: CacheStack, channel: grpc.aio.Channel) -> None:
    alice = ChatClient(channel)
    first = await alice.create(QUESTION, max_tokens=48, temperature=0)
    await stored(stack, {"chat_id": first.chat_id}, 1)
    await alice.sdk.delete_chat(first.chat_id)
    assert await stack.entries({"chat_id": first.chat_id}) == 0
    again = await alice.create(PARAPHRASE, max_tokens=48, temperature=0)
    assert again.last is not None and not again.last.cached


async def test_clear_cache_deletes_only_the_callers_entries(
    stack: CacheStack, channel: grpc.aio.Channel
) -> None:
    alice, bob = ChatClient(channel), ChatClient(channel)
    await alice.create(QUESTION, max_tokens=48, temperature=0)
    await alice.create("Say hello.", max_tokens=48, temperature=0)
    await bob.create(QUESTION, max_tokens=48, temperature=0)
    await stored(stack, {"owner": alice.user}, 2)
    await stored(stack, {"owner": bob.user}, 1)
    assert await alice.sdk.clear_cache() == 2
    assert await stack.entries({"owner": alice.user}) == 0
    assert await stack.entries({"owner": bob.user}) == 1, "bob's entries are untouched"
    again = await alice.create(PARAPHRASE, max_tokens=48, temperature=0)
    assert again.last is not None and not again.last.cached


def deletes_in(embedding: LoggedProcess, collection: str) -> list[list[str]]:
    """The index partitions each delete in `collection` visited, oldest first (the vector service logs
    each delete at DEBUG, which the tests' embedding service writes)."""
    return [
        entry["partitions"]
        for entry in log_entries(embedding)
        if entry.get("msg") == "vector points deleted" and entry.get("collection") == collection
    ]


async def test_an_owners_deletes_visit_only_that_owners_partition(
    stack: CacheStack, channel: grpc.aio.Channel, embedding_service: tuple[str, LoggedProcess]
) -> None:
    """DeleteChat and ClearCache delete by the tenant key too: in local mode each tenant has a partition
    of its own, and a delete without its tenant scans every user's, one at a time on the index's thread."""
    alice, bob = ChatClient(channel), ChatClient(channel)
    first = await alice.create(QUESTION, max_tokens=48, temperature=0)
    await bob.create(QUESTION, max_tokens=48, temperature=0)
    await stored(stack, {"owner": alice.user}, 1)
    await stored(stack, {"owner": bob.user}, 1)
    alices = partition_name(stack.collection, alice.user)

    await alice.sdk.delete_chat(first.chat_id)
    assert deletes_in(embedding_service[1], stack.collection) == [[alices], []]

    await alice.create("Say hello.", max_tokens=48, temperature=0)
    await stored(stack, {"owner": alice.user}, 1)
    assert await alice.sdk.clear_cache() == 1
    # Alice's partition, then the global scope's (none here: nobody stored in it).
    assert deletes_in(embedding_service[1], stack.collection)[2:] == [[alices], []]
    assert await stack.entries({"owner": bob.user}) == 1, "bob's entries are untouched"


async def test_expired_entries_miss_and_are_purged(
    tmp_path: Path, inference_address: str, embedding_service: tuple[str, LoggedProcess]
) -> None:
    with cache_stack(
        tmp_path, inference_address, embedding_service[0], cache_ttl_s=1, cache_purge_interval_s=0.5
    ) as stack:
        async with grpc.aio.insecure_channel(stack.address) as channel:
            alice = ChatClient(channel)
            await alice.create(QUESTION, max_tokens=48, temperature=0)
            stored_at = time.time()
            await stored(stack, {"owner": alice.user}, 1)
            # The purge deletes the entry once its TTL has passed.
            await stored(stack, {"owner": alice.user}, 0)
            assert time.time() > stored_at + 1 - 0.5, "not purged before it expired"
            again = await alice.create(PARAPHRASE, max_tokens=48, temperature=0)
            assert again.last is not None and not again.last.cached


async def test_global_scope_shares_plain_chats_but_never_chats_with_their_own_system_prompt(
    tmp_path: Path, inference_address: str, embedding_service: tuple[str, LoggedProcess]
) -> None:
    with cache_stack(tmp_path, inference_address, embedding_service[0], cache_scope="global") as stack:
        async with grpc.aio.insecure_channel(stack.address) as channel:
            alice, bob = ChatClient(channel), ChatClient(channel)
            first = await alice.create(QUESTION, max_tokens=48, temperature=0)
            await stored(stack, {"owner": alice.user, "scope": GLOBAL_SCOPE}, 1)
            shared = await bob.create(PARAPHRASE, max_tokens=48, temperature=0)
            assert shared.last is not None and shared.last.cached and shared.text == first.text

            terse = "Answer in a few words."
            await alice.create("Say hello.", system_prompt=terse, max_tokens=48, temperature=0)
            await stored(stack, {"owner": alice.user, "scope": alice.user}, 1)
            stack.engine.clear()
            own = await bob.create("Say hello.", system_prompt=terse, max_tokens=48, temperature=0)
            assert own.last is not None and not own.last.cached
            assert stack.generated() == ["Say hello."]


async def test_two_chat_replicas_share_one_cache(
    tmp_path: Path, inference_address: str, embedding_service: tuple[str, LoggedProcess]
) -> None:
    with (
        cache_stack(tmp_path, inference_address, embedding_service[0]) as one,
        chat_service(
            f"sqlite+aiosqlite:///{tmp_path / 'two.db'}",
            inference_address,
            cache_address=one.vectors,
            cache_collection=one.collection,
            cache_lookup_timeout_s=10,
        ) as replica,
    ):
        two = replica.address
        user = f"user-{uuid.uuid4().hex[:8]}"
        async with (
            grpc.aio.insecure_channel(one.address) as first_channel,
            grpc.aio.insecure_channel(two) as second_channel,
        ):
            first = await ChatClient(first_channel, user).create(QUESTION, max_tokens=48, temperature=0)
            await stored(one, {"owner": user}, 1)
            other = await ChatClient(second_channel, user).create(PARAPHRASE, max_tokens=48, temperature=0)
            assert other.last is not None and other.last.cached and other.text == first.text


async def test_without_the_vector_service_answers_are_generated_and_the_failure_counted(
    tmp_path: Path, inference_address: str
) -> None:
    with (
        start_embedding_service(tmp_path / "qdrant") as vectors,
        cache_stack(tmp_path, inference_address, vectors.address) as stack,
    ):
        embedding = vectors.process
        async with grpc.aio.insecure_channel(stack.address) as channel:
            alice = ChatClient(channel)
            await alice.create(QUESTION, max_tokens=48, temperature=0)
            await stored(stack, {"owner": alice.user}, 1)
            embedding.kill()
            embedding.wait()
            stack.engine.clear()
            answer = await alice.create(PARAPHRASE, max_tokens=48, temperature=0)
            assert answer.last is not None and not answer.last.cached and answer.text
            assert stack.generated() == [PARAPHRASE], "the model answered instead"
            failures = [
                entry
                for entry in log_entries(stack.process)
                if entry.get("msg", "").startswith("semantic cache lookup failed")
            ]
            assert failures and failures[-1]["failures"] >= 1, "the failure is logged and counted"
