"""Per-user limits (one user cannot take the machine from the others): concurrent completions and
unfinished jobs, counted in the shared database so they hold across replicas.

The store's counting on both databases (racing takers never exceed the limit, a lapsed lease frees its
slot, a retry shares its slot or its job); then two real chat replicas on one PostgreSQL database, the real
model and a real NATS: user A at the limit is refused on either replica with RESOURCE_EXHAUSTED naming the
limit and a retry hint, while user B still streams; A starts again once a stream of theirs has ended, or
once the lease of a replica that died with A's stream has lapsed."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]  # no py.typed

from chat_service.domain import HistoryStrategy, JobRequest, JobState
from chat_service.storage.base import Lease, LimitReached
from chat_service.storage.sql import SqlConversationStore, SqlJobStore, open_sql_store
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.common.errors import STATUS_DETAILS_METADATA_KEY
from chatmesh.openai.v1 import openai_pb2, openai_pb2_grpc
from tests.support.chat import ChatClient, auth, drain
from tests.support.databases import fresh_postgres_database
from tests.support.nats import NatsServer, run_nats
from tests.support.processes import free_port, run_service, start_process, stop_process, wait_until_serving
from tests.support.services import COUNTING_SYSTEM_PROMPT
from tests.support.stack import chat_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

# Written out: the errors must name the variable a user sets (the services are started with typed settings).
COMPLETIONS_SETTING = "CHATMESH_CHAT_MAX_CONCURRENT_COMPLETIONS_PER_USER"
JOBS_SETTING = "CHATMESH_CHAT_MAX_ACTIVE_JOBS_PER_USER"
LEASE = Lease("replica-test", 60)


# -- the store, on both databases ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SqlConversationStore]:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("limits") / "chat.db"
        async with open_sql_store(f"sqlite+aiosqlite:///{path}") as sqlite_store:
            yield sqlite_store
        return
    async with fresh_postgres_database("chatmesh_limits") as url, open_sql_store(url) as pg_store:
        yield pg_store


@pytest.fixture
def new_user() -> Callable[[], str]:
    return lambda: f"user-{uuid.uuid4().hex}"


async def take(store: SqlConversationStore, user: str, lease: Lease = LEASE) -> uuid.UUID | None:
    """A new slot of the user's under a limit of 2, or None if refused."""
    slot = uuid.uuid4()
    try:
        assert await store.take_generation_slot(user, slot, lease, 2)
    except LimitReached as reached:
        assert reached.active == 2
        assert reached.oldest_started is not None and reached.oldest_started.tzinfo is not None
        return None
    return slot


async def test_racing_takers_never_exceed_the_limit(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    alice, bob = new_user(), new_user()
    taken = await asyncio.gather(*(take(store, alice) for _ in range(12)))
    held = [slot for slot in taken if slot is not None]
    assert len(held) == 2, "exactly the limit, however the takers interleave"
    assert await take(store, bob) is not None, "another user's slots are their own"
    assert await take(store, alice) is None
    await store.release_generation_slot(held[0])
    assert await take(store, alice) is not None, "a released slot is free again"
    assert await take(store, alice) is None


async def test_a_lapsed_lease_frees_its_slot_and_a_renewed_one_does_not(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    alice = new_user()
    # A replica that died: its lease ran out (already, here) and nobody renews it.
    assert await take(store, alice, Lease("dead", -1)) is not None
    renewed = await take(store, alice, Lease("alive", -1))
    assert renewed is not None
    await store.renew_generation_slot(renewed, LEASE)
    assert await take(store, alice) is not None, "the dead replica's slot no longer counts"
    assert await take(store, alice) is None, "the renewed one and the new one do"


async def test_a_retry_shares_the_slot_of_its_first_attempt(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    alice = new_user()
    first, other = uuid.uuid4(), uuid.uuid4()
    assert await store.take_generation_slot(alice, first, LEASE, 2)
    assert await store.take_generation_slot(alice, other, LEASE, 2)
    assert not await store.take_generation_slot(alice, first, LEASE, 2), "held already: shared, not refused"


async def test_jobs_beyond_the_limit_are_refused_but_a_retry_is_not(
    store: SqlConversationStore, new_user: Callable[[], str]
) -> None:
    jobs = SqlJobStore(store.database)
    alice, bob = new_user(), new_user()
    chat, _ = await store.create_chat(alice, "", "", HistoryStrategy.FULL)

    async def submit(user: str, chat_id: uuid.UUID) -> tuple[uuid.UUID, JobRequest, bool]:
        message, _ = await store.add_user_message(user, chat_id, "question", 1, None)
        request = JobRequest(user, chat_id, message.id, None, None, None, None, True)
        try:
            await jobs.create_job(request, max_active=2)
        except LimitReached as reached:
            assert reached.active == 2
            return message.id, request, False
        return message.id, request, True

    results = await asyncio.gather(*(submit(alice, chat.id) for _ in range(6)))
    accepted = [request for _, request, ok in results if ok]
    assert len(accepted) == 2, "exactly the limit, however the submissions interleave"
    job, created = await jobs.create_job(accepted[0], max_active=2)
    assert not created, "a retry of an accepted job gets it back, not a refusal"
    bobs_chat, _ = await store.create_chat(bob, "", "", HistoryStrategy.FULL)
    assert (await submit(bob, bobs_chat.id))[2]

    refused = next(message_id for message_id, _, ok in results if not ok)
    await jobs.discard_question(alice, refused)
    assert await store.chat_of_message(alice, accepted[0].user_message_id) == chat.id, "a job's stays"
    with pytest.raises(Exception, match="not found"):
        await store.chat_of_message(alice, refused)

    await jobs.update_job(job.id, JobState.SUCCEEDED, 1)
    assert (await submit(alice, chat.id))[2], "a finished job no longer counts"


# -- through two chat replicas on PostgreSQL -------------------------------------------------------------


LONG_REPLY = 600
"""Tokens of a counting reply that streams far longer than the test needs to act while it runs."""


def limited_env(address: str, url: str, inference: str, migrate: bool, **settings: Any) -> dict[str, str]:
    return chat_env(
        address, url, inference, migrate=migrate, **{"max_concurrent_completions_per_user": 2, **settings}
    )


def counting(chat_id: str, max_tokens: int = LONG_REPLY) -> pb.CompleteRequest:
    return pb.CompleteRequest(chat_id=chat_id, content="Count to 300.", max_tokens=max_tokens, temperature=0)


async def streaming(
    client: ChatClient, request: pb.CompleteRequest
) -> grpc.aio.UnaryStreamCall[pb.CompleteRequest, pb.CompletionEvent]:
    """A completion call once its text is flowing (it holds its slot from then until it ends)."""
    call = client.stub.Complete(request, metadata=client.metadata)
    while not (await call.read()).delta:
        pass
    return call


def retry_delay_ms(error: grpc.aio.AioRpcError) -> int:
    """The RetryInfo delay of a refusal's `google.rpc.Status` details."""
    raw = dict(error.trailing_metadata() or ())[STATUS_DETAILS_METADATA_KEY]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.RetryInfo()
    assert status.details and status.details[0].Unpack(info), status
    delay_ms: int = info.retry_delay.ToMilliseconds()
    return delay_ms


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    """The RESOURCE_EXHAUSTED a completion call ends with (before any event)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            raise AssertionError("a refused completion sends no event")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    return refused.value


async def test_a_user_at_the_limit_is_refused_on_every_replica_while_others_stream(
    inference_address: str,
) -> None:
    first, second = (f"127.0.0.1:{free_port()}" for _ in range(2))
    async with fresh_postgres_database("chatmesh_limits") as url:
        with (
            run_service("chat_service", limited_env(first, url, inference_address, True), first, 60),
            run_service("chat_service", limited_env(second, url, inference_address, False), second, 60),
        ):
            async with grpc.aio.insecure_channel(first) as one, grpc.aio.insecure_channel(second) as two:
                alice_one = ChatClient(one)
                alice_two = ChatClient(two, alice_one.user)
                bob = ChatClient(two)
                chat_id = (await alice_one.create(system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
                # Alice's two completions, one on each replica, both streaming.
                long_one = await streaming(alice_one, counting(chat_id))
                other_chat = (await alice_two.create(system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
                long_two = await streaming(alice_two, counting(other_chat))

                for client in (alice_one, alice_two):
                    error = await refusal(
                        client.stub.Complete(counting(chat_id, 4), metadata=client.metadata)
                    )
                    details = error.details() or ""
                    assert COMPLETIONS_SETTING in details and "limit is 2" in details, details
                    assert retry_delay_ms(error) > 0
                    assert int(dict(error.trailing_metadata() or ())["retry-after-ms"]) > 0
                # A new chat with a first message is refused before it is stored.
                before = len((await alice_one.list()).chats)
                await refusal(
                    alice_one.stub.CreateChat(
                        pb.CreateChatRequest(content="Hi", max_tokens=4), metadata=alice_one.metadata
                    )
                )
                assert len((await alice_one.list()).chats) == before, "the refused chat is not stored"
                # The stateless OpenAI-compatible completion counts against the same limit.
                openai_stub = openai_pb2_grpc.OpenAIServiceStub(two)
                models = await openai_stub.ListModels(
                    openai_pb2.ListModelsRequest(), metadata=auth(alice_one.user)
                )
                body = {
                    "model": models.data[0].id,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                }
                openai = openai_stub.CreateChatCompletion(
                    json_format.ParseDict(body, struct_pb2.Struct()), metadata=auth(alice_one.user)
                )
                openai_error = await refusal(openai)
                assert COMPLETIONS_SETTING in (openai_error.details() or "")

                # Meanwhile another user is served.
                served = await bob.create("What is the capital of France?", max_tokens=8, temperature=0)
                assert served.last is not None and served.last.finish_reason

                # Her second one, cancelled, gives its slot back (once its replica has seen the cancel).
                long_two.cancel()
                short_chat = (await alice_two.create()).chat_id

                short = pb.CompleteRequest(chat_id=short_chat, content="Hi", max_tokens=4, temperature=0)

                async def admitted() -> bool:
                    try:
                        reply = await drain(alice_two.stub.Complete(short, metadata=alice_two.metadata))
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                        return False
                    return reply.last is not None and bool(reply.last.finish_reason)

                await eventually(admitted, "alice admitted after her cancelled completion ended", 60)
                # That completion ended on its own and gave its slot back too: with the long one still
                # running, each of these takes her second slot in turn, on either replica. (Through the
                # SDK, which is done at the last event, before the call's status: the slot is given back
                # before that event is sent.)
                for client in (alice_one, alice_two, alice_one):
                    again = await client.complete(short_chat, "Hi", max_tokens=4, temperature=0)
                    assert again.last is not None and again.last.finish_reason
                # The refused questions were never stored.
                roles = [m.role for m in await alice_one.all_messages(chat_id)]
                assert roles == [pb.ROLE_USER], roles
                long_one.cancel()


async def test_the_slot_of_a_replica_that_died_frees_when_its_lease_lapses(inference_address: str) -> None:
    doomed_address, survivor_address = (f"127.0.0.1:{free_port()}" for _ in range(2))
    async with fresh_postgres_database("chatmesh_limits") as url:
        settings = {"max_concurrent_completions_per_user": 1, "completion_lease_s": 2}
        survivor_env = chat_env(survivor_address, url, inference_address, migrate=True, **settings)
        with run_service("chat_service", survivor_env, survivor_address, 60):
            doomed = start_process(
                [sys.executable, "-m", "chat_service"],
                chat_env(doomed_address, url, inference_address, migrate=False, **settings),
            )
            try:
                wait_until_serving(doomed, doomed_address, 60)
                async with (
                    grpc.aio.insecure_channel(doomed_address) as one,
                    grpc.aio.insecure_channel(survivor_address) as two,
                ):
                    on_doomed = ChatClient(one)
                    on_survivor = ChatClient(two, on_doomed.user)
                    chat_id = (await on_survivor.create(system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
                    await streaming(on_doomed, counting(chat_id))
                    await refusal(
                        on_survivor.stub.Complete(counting(chat_id, 4), metadata=on_survivor.metadata)
                    )
                    doomed.send_signal(signal.SIGKILL)
                    doomed.wait()

                    async def admitted() -> bool:
                        try:
                            reply = await on_survivor.complete(chat_id, "Hi", max_tokens=4, temperature=0)
                        except grpc.aio.AioRpcError as exc:
                            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                            return False
                        return reply.last is not None

                    # Patient: on a loaded machine the admitted completion itself may take a while.
                    await eventually(admitted, "the dead replica's slot lapsed", timeout_s=60)
            finally:
                stop_process(doomed)
                doomed.remove_log()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with run_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


async def test_a_user_at_the_jobs_limit_is_refused_on_every_replica_and_nothing_is_stored(
    inference_address: str, nats_server: NatsServer
) -> None:
    first, second = (f"127.0.0.1:{free_port()}" for _ in range(2))
    jobs = {
        "jobs_nats_url": nats_server.url,
        "jobs_stream": "JOBS_LIMITS",
        "jobs_workers": 0,  # what is queued stays queued
        "max_active_jobs_per_user": 1,
    }
    async with fresh_postgres_database("chatmesh_limits") as url:
        with (
            run_service("chat_service", chat_env(first, url, inference_address, True, **jobs), first, 60),
            run_service(
                "chat_service", chat_env(second, url, inference_address, migrate=False, **jobs), second, 60
            ),
        ):
            async with grpc.aio.insecure_channel(first) as one, grpc.aio.insecure_channel(second) as two:
                alice_one = ChatClient(one)
                alice_two, bob = ChatClient(two, alice_one.user), ChatClient(two)
                chat_id = (await alice_one.create()).chat_id
                submit = pb.SubmitCompletionRequest(chat_id=chat_id, content="First.", request_id="first")
                queued = await chat_pb2_grpc.ChatServiceStub(one).SubmitCompletion(
                    submit, metadata=alice_one.metadata
                )
                assert queued.state == pb.JOB_STATE_QUEUED
                stub_two = chat_pb2_grpc.ChatServiceStub(two)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub_two.SubmitCompletion(
                        pb.SubmitCompletionRequest(chat_id=chat_id, content="Second."),
                        metadata=alice_two.metadata,
                    )
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                details = refused.value.details() or ""
                assert JOBS_SETTING in details and "limit is 1" in details, details
                assert retry_delay_ms(refused.value) > 0
                retried = await stub_two.SubmitCompletion(submit, metadata=alice_two.metadata)
                assert retried.job_id == queued.job_id, "a retry of the queued job is not refused"
                assert [m.content for m in await alice_two.all_messages(chat_id)] == ["First."]
                bobs_chat = (await bob.create()).chat_id
                bobs = await stub_two.SubmitCompletion(
                    pb.SubmitCompletionRequest(chat_id=bobs_chat, content="Mine."), metadata=bob.metadata
                )
                assert bobs.state == pb.JOB_STATE_QUEUED, "another user's jobs are their own"
