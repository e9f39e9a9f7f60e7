"""The SDK (`chatmesh.client`) against a scripted fake ChatService on a real in-process gRPC server:
token metadata, typed events, retries that reuse the request_id and do not repeat text, errors as
domain exceptions (also mid-stream), deadlines, pagination, and the blocking wrapper."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.client import (
    NO_RETRY,
    AsyncChatClient,
    ChatClient,
    CompletionDiverged,
    Delta,
    Finished,
    RetryPolicy,
    Started,
)
from chatmesh.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

CHAT = "3f2b8c1e-0000-4000-8000-000000000001"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.01)


@dataclass(frozen=True)
class Abort:
    """A scripted failure: end the call with this status."""

    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str], ...] = ()


class Hang:
    """A scripted stall: never answer (until the client gives up)."""


Step = pb.CompletionEvent | Abort | Hang


def started(user_message_id: str = "m1") -> pb.CompletionEvent:
    return pb.CompletionEvent(chat_id=CHAT, user_message_id=user_message_id)


def delta(text: str) -> pb.CompletionEvent:
    return pb.CompletionEvent(delta=text)


def finished(completion_tokens: int = 3) -> pb.CompletionEvent:
    return pb.CompletionEvent(
        finish_reason=pb.FINISH_REASON_STOP,
        usage=pb.Usage(prompt_tokens=7, completion_tokens=completion_tokens),
        assistant_message_id="m2",
    )


def error_event(code: str, message: str) -> pb.CompletionEvent:
    return pb.CompletionEvent(error=pb.StreamError(code=code, message=message))


@dataclass
class FakeChatService(chat_pb2_grpc.ChatServiceServicer):  # type: ignore[misc]
    """Answers each call with the next script of `scripts`; records requests and their metadata."""

    scripts: list[list[Step]] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    chats: list[pb.Chat] = field(default_factory=list)

    async def _play(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        self.requests.append(request)
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        for step in self.scripts.pop(0):
            if isinstance(step, Abort):
                await context.abort(step.code, step.details, trailing_metadata=step.trailing)
            elif isinstance(step, Hang):
                await asyncio.Event().wait()
            else:
                yield step

    # Async generator functions themselves: that is how grpc.aio recognises a streaming handler.
    async def Complete(self, request: pb.CompleteRequest, context: Any) -> AsyncIterator[pb.CompletionEvent]:
        async for event in self._play(request, context):
            yield event

    async def CreateChat(
        self, request: pb.CreateChatRequest, context: Any
    ) -> AsyncIterator[pb.CompletionEvent]:
        async for event in self._play(request, context):
            yield event

    async def ListChats(self, request: pb.ListChatsRequest, context: Any) -> pb.ListChatsResponse:
        self.requests.append(request)
        offset = int(request.page_token or 0)
        end = offset + request.page_size
        token = str(end) if end < len(self.chats) else ""
        return pb.ListChatsResponse(chats=self.chats[offset:end], next_page_token=token)

    async def DeleteChat(self, request: pb.DeleteChatRequest, context: Any) -> pb.DeleteChatResponse:
        async for _ in self._play(request, context):
            pass
        return pb.DeleteChatResponse()

    async def UpdateChat(self, request: pb.UpdateChatRequest, context: Any) -> pb.UpdateChatResponse:
        self.requests.append(request)
        return pb.UpdateChatResponse(chat=pb.Chat(chat_id=request.chat_id, model=request.model))

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        self.requests.append(request)
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(name="gemma-3-270m", context_length=2048, default_max_tokens=256),
                pb.ModelInfo(name="smollm2-135m-instruct", context_length=2048, default_max_tokens=256),
            ],
            default_model="gemma-3-270m",
        )


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeChatService, str]]:
    service = FakeChatService()
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield service, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_stream_yields_typed_events_and_sends_the_token(fake: tuple[FakeChatService, str]) -> None:
    service, address = fake
    service.scripts.append([started(), delta("Par"), delta("is"), finished()])
    async with AsyncChatClient(address, token="tok-1") as client:
        events = [event async for event in client.stream("Capital of France?", chat_id=CHAT, max_tokens=9)]
    assert [type(e) for e in events] == [Started, Delta, Delta, Finished]
    assert isinstance(events[0], Started) and events[0].user_message_id == "m1"
    assert [e.text for e in events if isinstance(e, Delta)] == ["Par", "is"]
    last = events[-1]
    assert (
        isinstance(last, Finished) and last.usage.completion_tokens == 3 and last.assistant_message_id == "m2"
    )
    assert service.tokens == ["Bearer tok-1"]
    request = service.requests[0]
    assert (request.chat_id, request.content, request.max_tokens) == (CHAT, "Capital of France?", 9)
    assert request.request_id, "every completion carries a request id, so that it can be retried"


async def test_keywords_fill_the_request_and_a_misspelt_one_is_refused(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    service.scripts.append([started(), delta("Hi"), finished()])
    async with AsyncChatClient(address) as client:
        await client.complete("Hi", title="T", temperature=0.5, seed=0, skip_cache=True)
        with pytest.raises(TypeError, match="'temprature'"):
            client.stream("Hi", temprature=0.5)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="'max_token'"):
            await client.submit_job(CHAT, "Hi", max_token=5)  # type: ignore[call-arg]
    [request] = service.requests
    assert isinstance(request, pb.CreateChatRequest)
    assert (request.title, request.temperature, request.seed, request.skip_cache) == ("T", 0.5, 0, True)
    assert request.HasField("seed"), "a seed of 0 is sent, not taken for unset"
    assert not request.HasField("max_tokens") and not request.HasField("top_p"), "unset: the server's default"


async def test_a_retry_after_connection_loss_reuses_the_request_id_and_repeats_no_text(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    service.scripts += [
        [started(), delta("One, "), delta("two"), Abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")],
        # The retry joins the running completion: the service replays it from the start.
        [started(), delta("One, "), delta("two, "), delta("three"), finished()],
    ]
    tokens = iter(["first", "refreshed"])
    async with AsyncChatClient(address, token=lambda: next(tokens), retry=FAST_RETRY) as client:
        reply = await client.complete("Count.", chat_id=CHAT, request_id="req-7")
    assert reply.text == "One, two, three"
    assert (reply.user_message_id, reply.assistant_message_id, reply.request_id) == ("m1", "m2", "req-7")
    assert [r.request_id for r in service.requests] == ["req-7", "req-7"]
    assert service.tokens == ["Bearer first", "Bearer refreshed"], "the token is asked for on every attempt"


async def test_a_stored_reply_replayed_in_one_piece_continues_the_stream(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    service.scripts += [
        [started(), delta("Hello"), Abort(grpc.StatusCode.UNAVAILABLE, "replica went away")],
        [started(), delta("Hello there."), finished()],
    ]
    async with AsyncChatClient(address, retry=FAST_RETRY) as client:
        texts = [e.text async for e in client.stream("Hi", chat_id=CHAT) if isinstance(e, Delta)]
    assert texts == ["Hello", " there."]
    assert service.requests[0].request_id == service.requests[1].request_id


async def test_a_regenerated_reply_that_contradicts_the_received_text_is_an_error(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    service.scripts += [
        [started(), delta("Blue"), Abort(grpc.StatusCode.UNAVAILABLE, "engine died")],
        [started(), delta("Green"), finished()],
    ]
    async with AsyncChatClient(address, retry=FAST_RETRY) as client:
        with pytest.raises(CompletionDiverged) as err:
            await client.complete("A colour?", chat_id=CHAT)
    assert err.value.received == "Blue"


async def test_a_mid_stream_error_event_raises_the_mapped_error_with_the_status_as_cause(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    service.scripts.append(
        [
            started(),
            delta("Par"),
            error_event("UNAVAILABLE", "inference service failed"),
            Abort(grpc.StatusCode.UNAVAILABLE, "inference service failed"),
        ]
    )
    received: list[object] = []
    async with AsyncChatClient(address, retry=NO_RETRY) as client:
        with pytest.raises(Unavailable) as err:
            async for event in client.stream("Capital?", chat_id=CHAT):
                received.append(event)
    assert [type(e) for e in received] == [Started, Delta]
    assert "inference service failed" in str(err.value)
    assert isinstance(err.value.__cause__, grpc.aio.AioRpcError)
    assert err.value.__cause__.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_error_event_is_an_error_even_when_the_status_says_ok(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    service.scripts.append([started(), error_event("NOT_FOUND", "chat was deleted")])
    async with AsyncChatClient(address, retry=NO_RETRY) as client:
        with pytest.raises(NotFound, match="chat was deleted"):
            await client.complete("Hi", chat_id=CHAT)


async def test_a_stream_that_ends_without_a_final_event_is_unavailable(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    service.scripts.append([started(), delta("Par")])
    async with AsyncChatClient(address, retry=NO_RETRY) as client:
        with pytest.raises(Unavailable, match="without a final event"):
            await client.complete("Hi", chat_id=CHAT)


async def test_bad_input_is_invalid_argument_naming_the_field_and_is_not_retried(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    service.scripts.append([Abort(grpc.StatusCode.INVALID_ARGUMENT, "content: must not be empty")])
    async with AsyncChatClient(address, retry=FAST_RETRY) as client:
        with pytest.raises(InvalidArgument) as err:
            await client.complete(" ", chat_id=CHAT)
    assert err.value.field == "content"
    assert len(service.requests) == 1


async def test_overload_is_retried_and_surfaces_with_its_retry_hint_when_it_persists(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    busy = Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "5"),))
    service.scripts += [[busy], [busy]]
    async with AsyncChatClient(address, retry=RetryPolicy(max_attempts=2)) as client:
        with pytest.raises(ResourceExhausted) as err:
            await client.complete("Hi", chat_id=CHAT)
    assert err.value.retry_after_s == 0.005
    assert len(service.requests) == 2 and len({r.request_id for r in service.requests}) == 1


async def test_unauthenticated_is_raised_as_such(fake: tuple[FakeChatService, str]) -> None:
    service, address = fake
    service.scripts.append([Abort(grpc.StatusCode.UNAUTHENTICATED, "missing authorization")])
    async with AsyncChatClient(address, retry=FAST_RETRY) as client:
        with pytest.raises(Unauthenticated):
            await client.create_chat(title="x")


async def test_the_deadline_bounds_the_call_and_its_retries(fake: tuple[FakeChatService, str]) -> None:
    service, address = fake
    service.scripts.append([started(), Hang()])
    async with AsyncChatClient(address, retry=FAST_RETRY, stream_timeout=0.2) as client:
        with pytest.raises(DeadlineExceeded):
            await client.complete("Hi", chat_id=CHAT)
    assert len(service.requests) == 1, "DEADLINE_EXCEEDED is not retried"


async def test_create_chat_returns_the_chat_and_iter_chats_follows_the_pages(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    chat = pb.Chat(chat_id=CHAT, title="plans")
    service.scripts.append([pb.CompletionEvent(chat_id=CHAT, chat=chat)])
    service.chats = [pb.Chat(chat_id=f"c{i}") for i in range(5)]
    async with AsyncChatClient(address) as client:
        assert await client.create_chat(title="plans") == chat
        ids = [c.chat_id async for c in client.iter_chats(page_size=2)]
    assert ids == ["c0", "c1", "c2", "c3", "c4"]
    assert [r.page_token for r in service.requests[1:]] == ["", "2", "4"]


async def test_a_delete_retried_after_its_answer_was_lost_is_done(fake: tuple[FakeChatService, str]) -> None:
    service, address = fake
    service.scripts += [
        [Abort(grpc.StatusCode.UNAVAILABLE, "connection reset")],
        [Abort(grpc.StatusCode.NOT_FOUND, "no such chat")],
    ]
    async with AsyncChatClient(address, retry=FAST_RETRY) as client:
        await client.delete_chat(CHAT)
    service.scripts.append([Abort(grpc.StatusCode.NOT_FOUND, "no such chat")])
    async with AsyncChatClient(address, retry=FAST_RETRY) as client:
        with pytest.raises(NotFound):
            await client.delete_chat(CHAT)


async def test_the_blocking_client_has_the_same_behaviour(fake: tuple[FakeChatService, str]) -> None:
    service, address = fake
    service.scripts += [
        [started(), delta("Par"), Abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")],
        [started(), delta("Paris"), finished()],
        [Abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be 0 to 2")],
    ]

    def use_blocking_client() -> tuple[list[str], InvalidArgument]:
        with ChatClient(address, token="tok", retry=FAST_RETRY) as client:
            texts = [e.text for e in client.stream("Capital?", chat_id=CHAT) if isinstance(e, Delta)]
            with pytest.raises(InvalidArgument) as err:
                client.complete("Hi", chat_id=CHAT, temperature=5)
        return texts, err.value

    # Its own thread: the blocking client runs its own event loop; this one keeps serving the fake.
    texts, error = await asyncio.to_thread(use_blocking_client)
    assert texts == ["Par", "is"]
    assert error.field == "temperature"
    assert service.tokens[0] == "Bearer tok"


async def test_a_chat_picks_its_model_and_switches_it_and_the_models_are_listed(
    fake: tuple[FakeChatService, str],
) -> None:
    service, address = fake
    chat = pb.Chat(chat_id=CHAT, model="smollm2-135m-instruct")
    service.scripts += [
        [pb.CompletionEvent(chat_id=CHAT, chat=chat)],
        [pb.CompletionEvent(chat_id=CHAT, user_message_id="m1", chat=chat), delta("Hi"), finished()],
    ]
    async with AsyncChatClient(address) as client:
        listed = await client.list_models()
        assert await client.create_chat(model="smollm2-135m-instruct") == chat
        await client.complete("Hi", model="smollm2-135m-instruct")
        with pytest.raises(ValueError, match="model"):
            client.stream("Hi", chat_id=CHAT, model="gemma-3-270m")
        switched = await client.update_chat(CHAT, model="gemma-3-270m")
        untouched = await client.update_chat(CHAT, title="t")
    assert [m.name for m in listed.models] == ["gemma-3-270m", "smollm2-135m-instruct"]
    assert listed.default_model == "gemma-3-270m"
    created, streamed = service.requests[1:3]
    assert isinstance(created, pb.CreateChatRequest) and created.model == "smollm2-135m-instruct"
    assert isinstance(streamed, pb.CreateChatRequest) and streamed.model == "smollm2-135m-instruct"
    assert switched.model == "gemma-3-270m"
    update, no_model = service.requests[3:]
    assert update.HasField("model") and update.model == "gemma-3-270m"
    assert not no_model.HasField("model"), "a model left out is unchanged, not cleared"
    assert untouched.model == ""


async def test_the_blocking_client_lists_models_too(fake: tuple[FakeChatService, str]) -> None:
    _, address = fake

    def listed() -> list[str]:
        with ChatClient(address) as client:
            return [model.name for model in client.list_models().models]

    assert await asyncio.to_thread(listed) == ["gemma-3-270m", "smollm2-135m-instruct"]
