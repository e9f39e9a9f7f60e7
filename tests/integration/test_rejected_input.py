"""Bad input through the real chat service, on PostgreSQL and on SQLite: INVALID_ARGUMENT naming the field,
never INTERNAL, and nothing written for a refused request; and the edges of good input (the largest seed)
accepted on both databases alike.

The chat service runs with jobs on (a real NATS JetStream server) and generates with the session's real
inference service.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.openai.v1 import openai_pb2, openai_pb2_grpc
from tests.support.chat import auth, drain
from tests.support.databases import fresh_postgres_database
from tests.support.nats import NatsServer, run_nats
from tests.support.processes import free_port, run_service
from tests.support.stack import chat_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

MAX_SEED = 2**64 - 1
SHORT: dict[str, Any] = {"max_tokens": 4, "temperature": 0.0}
NUL = "before\x00after"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with run_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
async def chat_address(
    request: pytest.FixtureRequest,
    inference_address: str,
    nats_server: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    """A chat service with jobs, on a fresh database of either kind."""
    address = f"127.0.0.1:{free_port()}"
    async with fresh_postgres_database("chatmesh_bad_input") as postgres_url:
        url = (
            postgres_url
            if request.param == "postgresql"
            else f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'chat.db'}"
        )
        env = chat_env(
            address, url, inference_address, jobs_nats_url=nats_server.url, jobs_stream=f"BAD_{request.param}"
        )
        with run_service("chat_service", env, address, 60) as process:
            yield address
        assert process.returncode == 0, process.output_tail()


@pytest.fixture
async def stub(chat_address: str) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(chat_address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture
async def openai(chat_address: str) -> AsyncIterator[openai_pb2_grpc.OpenAIServiceStub]:
    async with grpc.aio.insecure_channel(chat_address) as channel:
        yield openai_pb2_grpc.OpenAIServiceStub(channel)


@pytest.fixture
def user() -> tuple[tuple[str, str], ...]:
    """Call metadata of a user of the test's own."""
    return auth(f"user-{uuid.uuid4().hex[:8]}")


async def refused(call: Any, field: str) -> None:
    """`call` (awaitable or stream) fails INVALID_ARGUMENT naming `field`."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert (err.value.details() or "").startswith(f"{field}: "), err.value.details()


async def new_chat(stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...]) -> str:
    return (await drain(stub.CreateChat(pb.CreateChatRequest(), metadata=user))).first.chat_id


async def messages(
    stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...], chat_id: str
) -> list[pb.ChatMessage]:
    reply = await stub.GetMessages(pb.GetMessagesRequest(chat_id=chat_id), metadata=user)
    return list(reply.messages)


def token(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


SOME_CHAT = "00000000-0000-0000-0000-000000000001"


@pytest.mark.parametrize(
    "page_token",
    [
        token("m|²"),  # str.isdigit takes it
        token("m|٣"),  # int() takes it
        token(f"m|{2**63}"),  # past BIGINT
        token("m|" + "9" * 40),
        token("m|-1"),
        token(f"c|2024-05-01T12:00:00|{SOME_CHAT}"),  # a naive time
        token(f"c|0001-01-01T00:00:00+05:00|{SOME_CHAT}"),  # before year 1 in UTC
        token("c|2024-05-01T12:00:00+00:00|not-a-chat"),
    ],
)
@pytest.mark.parametrize("method", ["ListChats", "GetMessages"])
async def test_hand_made_page_tokens_are_invalid_argument(
    stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...], method: str, page_token: str
) -> None:
    chat_id = await new_chat(stub, user)
    if method == "ListChats":
        call = stub.ListChats(pb.ListChatsRequest(page_token=page_token), metadata=user)
    else:
        call = stub.GetMessages(pb.GetMessagesRequest(chat_id=chat_id, page_token=page_token), metadata=user)
    await refused(call, "page_token")


async def test_page_tokens_at_the_edges_of_their_range_are_served(
    stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...]
) -> None:
    chat_id = await new_chat(stub, user)
    last = token(f"m|{2**63 - 1}")
    page = await stub.GetMessages(pb.GetMessagesRequest(chat_id=chat_id, page_token=last), metadata=user)
    assert list(page.messages) == []
    latest = token(f"c|9999-12-31T23:59:59.999999+00:00|{SOME_CHAT}")
    page = await stub.ListChats(pb.ListChatsRequest(page_token=latest), metadata=user)  # type: ignore[assignment]
    assert [chat.chat_id for chat in page.chats] == [chat_id]  # type: ignore[attr-defined]
    earliest = token(f"c|0001-01-01T00:00:00-05:00|{SOME_CHAT}")
    page = await stub.ListChats(pb.ListChatsRequest(page_token=earliest), metadata=user)  # type: ignore[assignment]
    assert list(page.chats) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"title": NUL}, "title"),
        ({"system_prompt": NUL}, "system_prompt"),
        ({"content": NUL, **SHORT}, "content"),
        ({"content": "Hi", "request_id": NUL, **SHORT}, "request_id"),
    ],
)
async def test_nul_in_a_new_chat_is_invalid_argument_and_stores_nothing(
    stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...], fields: dict[str, Any], field: str
) -> None:
    await refused(stub.CreateChat(pb.CreateChatRequest(**fields), metadata=user), field)
    assert list((await stub.ListChats(pb.ListChatsRequest(), metadata=user)).chats) == []


async def test_nul_in_a_chat_s_messages_and_settings_is_invalid_argument_and_stores_nothing(
    stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...]
) -> None:
    chat_id = await new_chat(stub, user)
    await refused(
        stub.Complete(pb.CompleteRequest(chat_id=chat_id, content=NUL, **SHORT), metadata=user), "content"
    )
    await refused(
        stub.SubmitCompletion(pb.SubmitCompletionRequest(chat_id=chat_id, content=NUL), metadata=user),
        "content",
    )
    await refused(stub.UpdateChat(pb.UpdateChatRequest(chat_id=chat_id, title=NUL), metadata=user), "title")
    await refused(
        stub.UpdateChat(pb.UpdateChatRequest(chat_id=chat_id, system_prompt=NUL), metadata=user),
        "system_prompt",
    )
    assert await messages(stub, user, chat_id) == []
    (chat,) = (await stub.ListChats(pb.ListChatsRequest(), metadata=user)).chats
    assert (chat.title, chat.system_prompt) == ("", "")


@pytest.mark.parametrize("index", [0, 1])
async def test_nul_in_an_openai_message_is_invalid_argument(
    openai: openai_pb2_grpc.OpenAIServiceStub, user: tuple[tuple[str, str], ...], index: int
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    messages[index]["content"] = NUL
    body = struct_pb2.Struct()
    body.update({"model": "", "messages": messages})
    models = await openai.ListModels(openai_pb2.ListModelsRequest(), metadata=user)
    body["model"] = models.data[0].id
    await refused(openai.CreateChatCompletion(body, metadata=user), f"messages[{index}].content")


async def test_a_refused_job_leaves_no_message(
    stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...]
) -> None:
    chat_id = await new_chat(stub, user)
    request = pb.SubmitCompletionRequest(chat_id=chat_id, content="Hi", seed=MAX_SEED, temperature=3.0)
    await refused(stub.SubmitCompletion(request, metadata=user), "temperature")
    assert await messages(stub, user, chat_id) == []


async def test_the_largest_seed_is_kept_by_a_job_and_answered(
    stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...]
) -> None:
    chat_id = await new_chat(stub, user)
    request = pb.SubmitCompletionRequest(chat_id=chat_id, content="Hi", seed=MAX_SEED, **SHORT)
    job = await stub.SubmitCompletion(request, metadata=user)
    done: list[pb.Job] = []

    async def finished() -> bool:
        current = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=user)
        if current.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED):
            done.append(current)
        return bool(done)

    # The worker read the job's seed back from the database and generated with it.
    await eventually(finished, "the job finished", 60)
    assert done[0].state == pb.JOB_STATE_SUCCEEDED, done[0].error
    assert [m.role for m in await messages(stub, user, chat_id)] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]


async def test_the_largest_seed_is_taken_by_completions(
    stub: chat_pb2_grpc.ChatServiceStub, user: tuple[tuple[str, str], ...]
) -> None:
    created = await drain(
        stub.CreateChat(pb.CreateChatRequest(content="Hi", seed=MAX_SEED, **SHORT), metadata=user)
    )
    chat_id = created.first.chat_id
    answered = await drain(
        stub.Complete(
            pb.CompleteRequest(chat_id=chat_id, content="And?", seed=MAX_SEED, **SHORT), metadata=user
        )
    )
    assert answered.last is not None and answered.last.assistant_message_id
    assert len(await messages(stub, user, chat_id)) == 4
