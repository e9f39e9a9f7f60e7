"""The real chat service over gRPC, on real PostgreSQL and SQLite, with the real inference service.

The chat service talks to the inference service through a recording pass-through proxy, so tests can
see exactly what the engine received.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from chat_service.domain import Message, Role
from chat_service.history import as_prompt, prompt_token_bound
from chat_service.inference import GrpcInferenceClient, PromptMessage
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.client import AsyncChatClient
from chatmesh.common.errors import ResourceExhausted, error_from_rpc
from chatmesh.inference.v1 import inference_pb2 as ipb
from chatmesh.inference.v1 import inference_pb2_grpc
from tests.support.chat import ChatClient, auth, drain, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import free_port, run_service
from tests.support.recording_proxy import RecordingInferenceProxy, run_recording_proxy
from tests.support.services import COUNTING_SYSTEM_PROMPT
from tests.support.stack import chat_env, inference_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def proxy(inference_address: str) -> Iterator[tuple[str, RecordingInferenceProxy]]:
    with run_recording_proxy(inference_address) as running:
        yield running


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def chat_address(
    request: pytest.FixtureRequest,
    proxy: tuple[str, RecordingInferenceProxy],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    address = f"127.0.0.1:{free_port()}"
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('chat') / 'chat.db'}"
        with run_service("chat_service", chat_env(address, url, proxy[0]), address, timeout=60) as process:
            yield address
        assert process.returncode == 0
    else:
        async with fresh_postgres_database() as url:
            with run_service(
                "chat_service", chat_env(address, url, proxy[0]), address, timeout=60
            ) as process:
                yield address
            assert process.returncode == 0


@pytest.fixture
async def channel(chat_address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(chat_address) as channel:
        yield channel


@pytest.fixture
def alice(channel: grpc.aio.Channel) -> ChatClient:
    return ChatClient(channel)


@pytest.fixture
def bob(channel: grpc.aio.Channel) -> ChatClient:
    return ChatClient(channel)


@pytest.fixture
def recorder(proxy: tuple[str, RecordingInferenceProxy]) -> RecordingInferenceProxy:
    proxy[1].clear()
    return proxy[1]


async def expect_error(code: grpc.StatusCode, call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await drain(call)
        else:
            await call  # type: ignore[misc]
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


Events = AsyncIterator[pb.CompletionEvent]


def is_terminal(event: pb.CompletionEvent) -> bool:
    return event.finish_reason != pb.FINISH_REASON_UNSPECIFIED or event.HasField("error")


async def read_through_first_delta(events: Events) -> list[pb.CompletionEvent]:
    """The events of a stream up to and including its first delta."""
    read = [await anext(events)]
    while not read[-1].delta:
        read.append(await anext(events))
    return read


async def read_to_the_end(events: Events) -> tuple[list[pb.CompletionEvent], grpc.aio.AioRpcError | None]:
    """The rest of a stream's events, and its error status (None for OK)."""
    read: list[pb.CompletionEvent] = []
    try:
        async for event in events:
            read.append(event)
    except grpc.aio.AioRpcError as exc:
        return read, exc
    return read, None


def assert_one_terminal_event_last(events: list[pb.CompletionEvent]) -> pb.CompletionEvent:
    assert [is_terminal(e) for e in events].count(True) == 1, events
    assert is_terminal(events[-1])
    return events[-1]


async def test_create_with_first_message_streams_and_stores_both_messages(alice: ChatClient) -> None:
    created = await alice.create("What is the capital of France?", max_tokens=16, temperature=0)
    first = created.first
    assert first.chat.chat_id == first.chat_id and first.user_message_id
    assert created.deltas, "the reply streams as deltas"
    assert created.last is not None
    assert created.last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert created.last.usage.completion_tokens > 0 and created.last.usage.prompt_tokens > 0
    assert "Paris" in created.text

    messages = await alice.all_messages(created.chat_id)
    assert [m.role for m in messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert messages[0].message_id == first.user_message_id
    assert messages[0].content == "What is the capital of France?" and messages[0].token_count > 0
    assert messages[1].message_id == created.last.assistant_message_id
    assert messages[1].content == created.text
    assert messages[1].finish_reason == created.last.finish_reason

    listed = await alice.list()
    assert listed.chats[0].chat_id == created.chat_id
    assert listed.chats[0].title == "What is the capital of France?"


async def test_create_without_message_is_one_event_and_title_comes_from_first_message(
    alice: ChatClient,
) -> None:
    created = await alice.create(system_prompt="Answer briefly.", history_strategy=pb.HISTORY_STRATEGY_WINDOW)
    assert created.last is None and not created.first.user_message_id
    assert created.first.chat.history_strategy == pb.HISTORY_STRATEGY_WINDOW
    assert created.first.chat.title == ""
    await alice.complete(created.chat_id, "Tell me about the moon.\nIt orbits the earth.", max_tokens=4)
    chats = (await alice.list()).chats
    assert chats[0].title == "Tell me about the moon."


async def test_completion_prompt_carries_the_history(
    alice: ChatClient, recorder: RecordingInferenceProxy
) -> None:
    created = await alice.create("My name is Ada.", system_prompt="Be kind.", max_tokens=8, temperature=0)
    second = await alice.complete(created.chat_id, "What is my name?", max_tokens=8, temperature=0)
    prompt = recorder.chat_requests()[-1].messages
    assert [(m.role, m.content) for m in prompt] == [
        (ipb.ROLE_SYSTEM, "Be kind."),
        (ipb.ROLE_USER, "My name is Ada."),
        (ipb.ROLE_ASSISTANT, created.text),
        (ipb.ROLE_USER, "What is my name?"),
    ]
    assert second.first.chat_id == created.chat_id


async def test_list_and_history_are_paginated_newest_activity_first(alice: ChatClient) -> None:
    ids = [(await alice.create(title=f"chat {i}")).chat_id for i in range(5)]
    await alice.complete(ids[1], "bump", max_tokens=2)  # most recent activity now
    seen: list[str] = []
    token = ""
    while True:
        page = await alice.list(page_size=2, page_token=token)
        assert len(page.chats) <= 2
        seen += [c.chat_id for c in page.chats]
        token = page.next_page_token
        if not token:
            break
    assert seen == [ids[1], ids[4], ids[3], ids[2], ids[0]]

    for i in range(3):
        await alice.complete(ids[0], f"message {i}", max_tokens=2)
    first_page = await alice.messages(ids[0], page_size=4)
    second_page = await alice.messages(ids[0], page_size=4, page_token=first_page.next_page_token)
    contents = [m.content for m in [*first_page.messages, *second_page.messages]]
    assert contents[0::2] == ["message 0", "message 1", "message 2"]
    assert len(first_page.messages) == 4 and len(second_page.messages) == 2
    assert second_page.next_page_token == ""


async def test_update_and_delete(alice: ChatClient) -> None:
    created = await alice.create("hello", max_tokens=2)
    updated = await alice.stub.UpdateChat(
        pb.UpdateChatRequest(
            chat_id=created.chat_id, title="renamed", history_strategy=pb.HISTORY_STRATEGY_SUMMARY
        ),
        metadata=alice.metadata,
    )
    assert (updated.chat.title, updated.chat.history_strategy) == ("renamed", pb.HISTORY_STRATEGY_SUMMARY)
    assert updated.chat.system_prompt == ""
    await alice.stub.DeleteChat(pb.DeleteChatRequest(chat_id=created.chat_id), metadata=alice.metadata)
    assert created.chat_id not in [c.chat_id for c in (await alice.list()).chats]
    await expect_error(grpc.StatusCode.NOT_FOUND, alice.messages(created.chat_id))


async def test_another_users_chat_is_not_found_everywhere(alice: ChatClient, bob: ChatClient) -> None:
    created = await alice.create("secret plans", max_tokens=2)
    chat_id = created.chat_id
    assert chat_id not in [c.chat_id for c in (await bob.list(page_size=100)).chats]
    missing = str(uuid.uuid4())
    for target in (chat_id, missing):
        details = await expect_error(grpc.StatusCode.NOT_FOUND, bob.messages(target))
        assert "secret" not in details
        await expect_error(
            grpc.StatusCode.NOT_FOUND,
            bob.stub.Complete(pb.CompleteRequest(chat_id=target, content="hi"), metadata=bob.metadata),
        )
        await expect_error(
            grpc.StatusCode.NOT_FOUND,
            bob.stub.UpdateChat(pb.UpdateChatRequest(chat_id=target, title="mine"), metadata=bob.metadata),
        )
        await expect_error(
            grpc.StatusCode.NOT_FOUND,
            bob.stub.DeleteChat(pb.DeleteChatRequest(chat_id=target), metadata=bob.metadata),
        )
    # Alice's chat is untouched by Bob's attempts.
    messages = await alice.all_messages(chat_id)
    assert messages[0].content == "secret plans" and len(messages) == 2
    assert (await alice.list()).chats[0].title == "secret plans"


async def test_calls_without_a_valid_token_are_unauthenticated(channel: grpc.aio.Channel) -> None:
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    details = await expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.ListChats(pb.ListChatsRequest()))
    assert "authorization" in details
    forged = auth("alice", secret="not-the-server-secret-" + "y" * 30)
    await expect_error(
        grpc.StatusCode.UNAUTHENTICATED, stub.ListChats(pb.ListChatsRequest(), metadata=forged)
    )
    await expect_error(
        grpc.StatusCode.UNAUTHENTICATED,
        stub.ListChats(pb.ListChatsRequest(), metadata=(("authorization", "Basic abc"),)),
    )
    await expect_error(
        grpc.StatusCode.UNAUTHENTICATED, stub.CreateChat(pb.CreateChatRequest(content="hi"), metadata=forged)
    )
    await expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.ListModels(pb.ListModelsRequest()))
    await expect_error(
        grpc.StatusCode.UNAUTHENTICATED, stub.ListModels(pb.ListModelsRequest(), metadata=forged)
    )


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("Complete", pb.CompleteRequest(chat_id="CHAT", content=""), "content"),
        ("Complete", pb.CompleteRequest(chat_id="CHAT", content="x" * 32_001), "content"),
        ("Complete", pb.CompleteRequest(chat_id="not-a-uuid", content="hi"), "chat_id"),
        ("Complete", pb.CompleteRequest(chat_id="CHAT", content="hi", max_tokens=0), "max_tokens"),
        ("Complete", pb.CompleteRequest(chat_id="CHAT", content="hi", max_tokens=100_000), "max_tokens"),
        ("Complete", pb.CompleteRequest(chat_id="CHAT", content="hi", temperature=5), "temperature"),
        ("CreateChat", pb.CreateChatRequest(history_strategy=9), "history_strategy"),  # type: ignore[arg-type]
        ("CreateChat", pb.CreateChatRequest(title="t" * 201), "title"),
        ("ListChats", pb.ListChatsRequest(page_size=101), "page_size"),
        ("ListChats", pb.ListChatsRequest(page_token="garbage!"), "page_token"),
        ("GetMessages", pb.GetMessagesRequest(chat_id="CHAT", page_size=201), "page_size"),
        ("UpdateChat", pb.UpdateChatRequest(chat_id="CHAT", history_strategy=7), "history_strategy"),  # type: ignore[arg-type]
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    alice: ChatClient, method: str, request_: object, field: str
) -> None:
    chat_id = (await alice.create(title="target")).chat_id
    if hasattr(request_, "chat_id") and request_.chat_id == "CHAT":  # type: ignore[attr-defined]
        request_.chat_id = chat_id  # type: ignore[attr-defined]
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, getattr(alice.stub, method)(request_, metadata=alice.metadata)
    )
    assert details.startswith(f"{field}: "), details
    assert len(await alice.all_messages(chat_id)) == 0, "a rejected request stores nothing"


async def test_retry_with_the_same_request_id_returns_the_stored_answer(alice: ChatClient) -> None:
    chat_id = (await alice.create(title="retry")).chat_id
    first = await alice.complete(chat_id, "Name a color.", max_tokens=8, request_id="req-1")
    again = await alice.complete(chat_id, "Name a color.", max_tokens=8, request_id="req-1")
    assert again.first.user_message_id == first.first.user_message_id
    assert again.last is not None and first.last is not None
    assert again.last.assistant_message_id == first.last.assistant_message_id
    assert again.text == first.text
    assert again.last.usage == first.last.usage, "the retry reports the original usage"
    assert len(await alice.all_messages(chat_id)) == 2


async def test_concurrent_retries_join_the_running_completion(
    alice: ChatClient, recorder: RecordingInferenceProxy
) -> None:
    chat_id = (await alice.create(title="join", system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
    results = await asyncio.gather(
        *(
            alice.complete(chat_id, "Count to 300.", max_tokens=40, temperature=0, request_id="same")
            for _ in range(3)
        )
    )
    assert len({r.first.user_message_id for r in results}) == 1
    assert all(r.last is not None and r.last.finish_reason for r in results), "each ends with Finished"
    assert len({r.last.assistant_message_id for r in results if r.last}) == 1
    assert len({r.text for r in results}) == 1
    assert len(await alice.all_messages(chat_id)) == 2
    assert len(recorder.chat_requests()) == 1, "the engine generated the reply once"


async def test_a_joined_completion_outlives_its_cancelled_original(
    alice: ChatClient, recorder: RecordingInferenceProxy
) -> None:
    chat_id = (await alice.create(title="outlive", system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
    request = pb.CompleteRequest(
        chat_id=chat_id, content="Count to 300.", max_tokens=100, temperature=0, request_id="outlive"
    )
    original_call = alice.stub.Complete(request, metadata=alice.metadata)
    await read_through_first_delta(aiter(original_call))
    retry = aiter(alice.stub.Complete(request, metadata=alice.metadata))
    # A delta while the original still streams: the retry follows the running completion.
    joined = await read_through_first_delta(retry)
    original_call.cancel()

    rest, error = await read_to_the_end(retry)
    assert error is None, error
    events = [*joined, *rest]
    last = assert_one_terminal_event_last(events)
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH), "not cut short"
    question, reply = await alice.all_messages(chat_id)
    assert question.token_count > 0, "the question's count is stored with the reply"
    assert reply.message_id == last.assistant_message_id
    assert reply.content == "".join(e.delta for e in events)
    assert reply.finish_reason == last.finish_reason
    assert len(recorder.chat_requests()) == 1


async def test_client_cancel_keeps_the_partial_answer_marked_cancelled(
    alice: ChatClient, recorder: RecordingInferenceProxy
) -> None:
    chat_id = (await alice.create(title="cancel", system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
    request = pb.CompleteRequest(
        chat_id=chat_id, content="Count to 300.", max_tokens=300, temperature=0, request_id="cancel-me"
    )
    call = alice.stub.Complete(request, metadata=alice.metadata)
    received: list[str] = []
    user_message_id = ""
    async for event in call:
        user_message_id = user_message_id or event.user_message_id
        if event.delta:
            received.append(event.delta)
        if len(received) == 4:
            break
    call.cancel()
    # The service stops the engine once it notices the cancel, and stores the partial reply then.
    await recorder.until(lambda: user_message_id in recorder.ended_generates)
    # A retry now waits for that reply and returns it, cancelled as it is.
    retried = await alice.complete(chat_id, request.content, request_id=request.request_id)
    assert retried.last is not None and retried.last.finish_reason == pb.FINISH_REASON_CANCELLED
    assert retried.first.user_message_id == user_message_id
    messages = await alice.all_messages(chat_id)
    assert len(messages) == 2
    reply = messages[1]
    assert reply.message_id == retried.last.assistant_message_id and reply.content == retried.text
    assert reply.finish_reason == pb.FINISH_REASON_CANCELLED
    assert reply.content.startswith("".join(received))
    assert len(reply.content) < 300, "generation stopped soon after the cancel"
    assert len(recorder.chat_requests()) == 1, "the retry did not generate again"


WINDOW_CONTEXT = 256


@pytest.fixture(scope="module")
def small_context_chat(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str, RecordingInferenceProxy]]:
    """A chat service on an engine with a tiny context, so the window has to slide after a few turns.
    Yields (chat address, inference address, recorder)."""
    inference = f"127.0.0.1:{free_port()}"
    chat = f"127.0.0.1:{free_port()}"
    env = inference_env(inference, context_length=WINDOW_CONTEXT)
    with (
        run_service("inference_service", env, inference, timeout=60),
        run_recording_proxy(inference) as proxy,
    ):
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('window') / 'chat.db'}"
        with run_service("chat_service", chat_env(chat, url, proxy[0]), chat, timeout=60):
            yield chat, inference, proxy[1]


async def test_window_strategy_fits_the_context_and_drops_oldest_first(
    small_context_chat: tuple[str, str, RecordingInferenceProxy],
) -> None:
    chat_address, inference_address, recorder = small_context_chat
    async with grpc.aio.insecure_channel(chat_address) as channel:
        alice = ChatClient(channel)
        chat_id = (
            await alice.create(system_prompt="You are terse.", history_strategy=pb.HISTORY_STRATEGY_WINDOW)
        ).chat_id
        questions = [f"Question {i}: " + " ".join(f"w{i}x{j}" for j in range(12)) for i in range(6)]
        for question in questions:
            await alice.complete(chat_id, question, max_tokens=16, temperature=0)
    requests = recorder.chat_requests()
    assert len(requests) == len(questions)
    async with grpc.aio.insecure_channel(inference_address) as channel:
        engine = inference_pb2_grpc.InferenceServiceStub(channel)
        for number, request in enumerate(requests):
            counted = await engine.CountTokens(ipb.CountTokensRequest(messages=request.messages))
            assert counted.prompt_tokens + request.sampling.max_tokens <= WINDOW_CONTEXT
            assert request.messages[0].content == "You are terse."
            assert request.messages[-1].content == questions[number]
            users = [m.content for m in request.messages if m.role == ipb.ROLE_USER]
            # What is kept is the most recent stretch of the conversation, in order.
            assert users == questions[number - len(users) + 1 : number + 1]
    assert len([m for m in requests[-1].messages if m.role == ipb.ROLE_USER]) < len(questions), (
        "old turns dropped"
    )


async def test_summary_is_stored_and_extended_not_recomputed(
    alice: ChatClient, recorder: RecordingInferenceProxy
) -> None:
    chat_id = (await alice.create(history_strategy=pb.HISTORY_STRATEGY_SUMMARY)).chat_id
    calls_after_turn = []
    for turn in range(1, 7):
        await alice.complete(
            chat_id, f"Fact number {turn}: my item {turn} is blue.", max_tokens=8, temperature=0
        )
        calls_after_turn.append(len(recorder.summary_requests()))
    # keep 2 recent messages, fold once 4 are waiting: turns 4 and 6 fold, the others reuse the summary.
    assert calls_after_turn == [0, 0, 0, 1, 1, 2]
    first, second = recorder.summary_requests()
    first_text = first.messages[-1].content
    assert (
        "Fact number 1" in first_text and "Fact number 2" in first_text and "Fact number 3" not in first_text
    )
    second_text = second.messages[-1].content
    assert "Earlier summary:" in second_text, "the stored summary is extended"
    assert "Fact number 1" not in second_text.partition("\nUser:")[2], "old turns are not summarised again"
    assert "Fact number 3" in second_text and "Fact number 4" in second_text
    # Turn 5's prompt reused the first summary instead of the folded turns.
    turn5 = recorder.chat_requests()[4].messages
    assert turn5[0].role == ipb.ROLE_SYSTEM and turn5[0].content.startswith(
        "Summary of the earlier conversation"
    )
    assert not any("Fact number 1" in m.content for m in turn5[1:])


async def test_engine_failure_keeps_the_user_message_and_reports_unavailable(tmp_path: Path) -> None:
    """The engine killed mid-stream: the original request and a retry that joined it both end with the
    error event and its status; the question stays, with no broken reply; once the engine is back, the
    retry is answered."""
    inference = f"127.0.0.1:{free_port()}"
    chat = f"127.0.0.1:{free_port()}"
    engine_env = inference_env(inference, context_length=1024)
    with run_service("inference_service", engine_env, inference, timeout=60) as engine:
        env = chat_env(chat, f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", inference)
        with run_service("chat_service", env, chat, timeout=60):
            async with grpc.aio.insecure_channel(chat) as channel:
                client = ChatClient(channel)
                chat_id = (await client.create(title="doomed", system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
                request = pb.CompleteRequest(
                    chat_id=chat_id,
                    content="Count to 300.",
                    max_tokens=300,
                    temperature=0,
                    request_id="doomed",
                )
                original = aiter(client.stub.Complete(request, metadata=client.metadata))
                retry = aiter(client.stub.Complete(request, metadata=client.metadata))
                seen = {"original": await read_through_first_delta(original)}
                seen["retry"] = await read_through_first_delta(retry)  # it follows the running completion
                engine.kill()  # the engine dies mid-stream
                ends = dict(
                    zip(
                        seen,
                        await asyncio.gather(read_to_the_end(original), read_to_the_end(retry)),
                        strict=True,
                    )
                )
                for name, (rest, error) in ends.items():
                    events = [*seen[name], *rest]
                    last = assert_one_terminal_event_last(events)
                    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, (name, error)
                    assert last.error.code == "UNAVAILABLE" and last.error.message == error.details(), name
                messages = await client.all_messages(chat_id)
                assert [m.role for m in messages] == [pb.ROLE_USER], "no broken assistant message is stored"
                # Once the engine is back (a restart on the same address), the retry answers the stored
                # question: one question, one reply.
                with run_service("inference_service", engine_env, inference, timeout=60):
                    answered = await drain(client.stub.Complete(request, metadata=client.metadata))
                assert answered.last is not None and answered.last.finish_reason
                messages = await client.all_messages(chat_id)
                assert [m.role for m in messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
                assert messages[1].content == answered.text


async def test_full_strategy_reports_an_over_long_history_in_chat_api_terms(
    small_context_chat: tuple[str, str, RecordingInferenceProxy],
) -> None:
    chat_address, _, recorder = small_context_chat
    async with grpc.aio.insecure_channel(chat_address) as channel:
        alice = ChatClient(channel)
        chat_id = (await alice.create(history_strategy=pb.HISTORY_STRATEGY_FULL)).chat_id
        recorder.clear()
        question = "Question: " + " ".join(f"w{j}" for j in range(30))
        details = ""
        for _ in range(WINDOW_CONTEXT // 30 + 1):
            call = alice.stub.Complete(
                pb.CompleteRequest(chat_id=chat_id, content=question, max_tokens=16, temperature=0),
                metadata=alice.metadata,
            )
            try:
                await drain(call)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                details = err.details() or ""
                break
        assert details.startswith("history_strategy: "), details
        assert "HISTORY_STRATEGY_WINDOW" in details and "max_tokens" in details
        assert "messages" not in details and "sampling." not in details, "no inference API field names"
        # Detected before generating: the engine got a Generate only for the turns that fit.
        stored = await alice.all_messages(chat_id)
    assert [m.role for m in stored[-2:]] == [pb.ROLE_ASSISTANT, pb.ROLE_USER]
    assert len(recorder.chat_requests()) == len(stored) // 2


async def test_the_stored_counts_bound_the_real_prompt_from_above(
    alice: ChatClient, inference_address: str
) -> None:
    """The shortcut that skips CountTokens (chat_service.history.surely_fits) is only safe if its bound
    is never below the engine's own count: check it on a real chat with text that tokenizes densely."""
    system = "Réponds brièvement. 简短回答。"
    created = await alice.create(
        content="Translate 'good night' into French, Japanese and emoji 🌙.",
        system_prompt=system,
        history_strategy=pb.HISTORY_STRATEGY_FULL,
        max_tokens=24,
        temperature=0,
    )
    await alice.complete(created.chat_id, "And `def f(x): return x**2` in one word?", max_tokens=24)
    stored = await alice.all_messages(created.chat_id)
    history = [
        Message(
            id=uuid.UUID(m.message_id),
            chat_id=uuid.UUID(created.chat_id),
            user_id="alice",
            seq=seq,
            role=Role.USER if m.role == pb.ROLE_USER else Role.ASSISTANT,
            content=m.content,
            token_count=m.token_count,
            finish_reason=None,
            request_id=None,
            # A reply answers the question before it, and its model counted both.
            reply_to=uuid.UUID(stored[seq - 2].message_id) if m.role == pb.ROLE_ASSISTANT else None,
            created_at=m.create_time.ToDatetime(),
            model=m.model or None,
        )
        for seq, m in enumerate(stored, start=1)
    ]
    assert all(m.token_count > 0 for m in history), "every finished turn has its counts stored"
    model = created.first.chat.model
    assert model and all(m.model == model for m in history if m.role is Role.ASSISTANT)
    fixed = [PromptMessage("system", system)]
    async with grpc.aio.insecure_channel(inference_address) as channel:
        real = await GrpcInferenceClient(channel).count_message_tokens(
            [*fixed, *map(as_prompt, history)], model=model
        )
    # The bound trusts the stored counts (they are this model's), so it is their bound that is checked.
    assert prompt_token_bound(fixed, history, limit=10**9, model=model) >= real.prompt_tokens


async def test_a_saturated_engine_is_resource_exhausted_before_any_event(tmp_path: Path) -> None:
    """Backpressure: with the engine's only slot taken and no queue, a completion is refused at once with
    a retry hint, as the call's status (a 429 through the gateway), not as an error event after a 200;
    retried with the same request_id once the slot is free, it is answered and stored once."""
    inference = f"127.0.0.1:{free_port()}"
    chat = f"127.0.0.1:{free_port()}"
    engine_env = inference_env(
        inference,
        backend="llama_server",
        max_concurrent=1,
        max_queue=0,
        context_length=1024,
        run_dir=tmp_path,
    )
    with run_service("inference_service", engine_env, inference, timeout=120):
        env = chat_env(chat, f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", inference)
        with run_service("chat_service", env, chat, timeout=60):
            async with grpc.aio.insecure_channel(chat) as channel:
                client = ChatClient(channel)
                busy = (await client.create(system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
                holding = client.stub.Complete(
                    pb.CompleteRequest(chat_id=busy, content="Count to 300.", max_tokens=300, temperature=0),
                    metadata=client.metadata,
                )
                await read_through_first_delta(aiter(holding))  # the engine's only slot is taken
                other = (await client.create(title="waits")).chat_id
                request = pb.CompleteRequest(chat_id=other, content="Hi", max_tokens=8, request_id="later")
                refused = client.stub.Complete(request, metadata=client.metadata)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await refused.read()
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
                mapped = error_from_rpc(err.value, "chat service")
                assert isinstance(mapped, ResourceExhausted) and mapped.retry_after_s > 0
                holding.cancel()  # frees the slot, as soon as the engine hears of it
                # The SDK retries RESOURCE_EXHAUSTED after the server's hint, with the same request_id.
                sdk = AsyncChatClient(channel, token=token_for(client.user))
                answered = await sdk.complete("Hi", chat_id=other, max_tokens=8, request_id="later")
                assert answered.assistant_message_id
                messages = await client.all_messages(other)
                assert [m.role for m in messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT], "stored once"


async def test_a_chat_sticks_to_one_engine_replica_and_fails_over(
    inference_address: str, tmp_path: Path
) -> None:
    """With several inference replicas (two recording proxies here, in front of the session's engine),
    every turn of a chat goes to the same replica, where its prompt prefix is cached; when that replica
    is gone, the chat's next turn goes to the other one."""
    chat = f"127.0.0.1:{free_port()}"
    stacks = [contextlib.ExitStack() for _ in range(2)]
    try:
        proxies = [stack.enter_context(run_recording_proxy(inference_address)) for stack in stacks]
        addresses = ",".join(address for address, _ in proxies)
        env = chat_env(chat, f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", addresses)
        with run_service("chat_service", env, chat, timeout=60):
            async with grpc.aio.insecure_channel(chat) as channel:
                client = ChatClient(channel)
                chats = [(await client.create(title=f"chat {i}")).chat_id for i in range(6)]

                def replicas_of(question: str) -> set[int]:
                    return {
                        index
                        for index, (_, proxy) in enumerate(proxies)
                        for request in proxy.chat_requests()
                        if request.messages[-1].content == question
                    }

                home: dict[str, int] = {}
                for turn in range(2):
                    for chat_id in chats:
                        question = f"{chat_id} turn {turn}"
                        await client.complete(chat_id, question, max_tokens=4, temperature=0)
                        (replica,) = replicas_of(question)
                        assert home.setdefault(chat_id, replica) == replica, "a chat stays on its replica"
                lost = 0 if 0 in home.values() else 1  # a replica that some chat calls home
                stacks[lost].close()
                for chat_id in chats:
                    question = f"{chat_id} after the loss"
                    done = await client.complete(chat_id, question, max_tokens=4, temperature=0)
                    assert done.last is not None and done.last.HasField("usage"), "answered regardless"
                    assert replicas_of(question) == {1 - lost}, "failed over to the replica left"
    finally:
        for stack in stacks:
            stack.close()
