"""The OpenAI servicer's edges that the real mesh cannot be made to show on demand: a failure after the
stream started, a refusal before it, and every body it writes checked against the published schemas."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import jsonschema
import pytest
from google.protobuf import json_format, struct_pb2

from chat_service import openai_api
from chat_service.conversations import CompletionEvent, Delta, Finished
from chat_service.domain import FinishReason
from chat_service.inference import EngineInfo, PromptMessage, SamplingOptions, ServedModels
from chat_service.openai_api import OpenAIServicer, read_request
from chatmesh.common import auth
from chatmesh.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from chatmesh.openai.v1 import openai_pb2 as pb
from gateway.openapi_schemas import OPENAI_SCHEMAS

ENGINE = EngineInfo("tiny", 2048, 64)
SMALL = EngineInfo("small", 512, 16)


class FakeConversations:
    """`Conversations.answer` replaying `events`, raising `error` after them if given; two models served,
    "tiny" the default."""

    def __init__(self, events: list[CompletionEvent], error: Exception | None = None) -> None:
        self.models = ServedModels([ENGINE, SMALL])
        self._events = events
        self._error = error
        self.asked: list[tuple[str, list[PromptMessage], SamplingOptions]] = []
        self.models_asked: list[str] = []

    async def answer(
        self,
        user_id: str,
        messages: list[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        *,
        model: str,
    ) -> AsyncGenerator[CompletionEvent, None]:
        self.asked.append((user_id, messages, sampling))
        self.models_asked.append(model)
        for event in self._events:
            yield event
        if self._error is not None:
            raise self._error


def body(**fields: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    json_format.ParseDict(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}, message
    )
    return message


async def bodies(conversations: FakeConversations, request: struct_pb2.Struct) -> list[bytes]:
    token = auth._current_user.set("alice")
    try:
        servicer = OpenAIServicer(conversations, created=1)  # type: ignore[arg-type]
        stream: AsyncIterator[Any] = servicer.CreateChatCompletion(request, None)
        return [item.data async for item in stream]
    finally:
        auth._current_user.reset(token)


def validate(instance: Any, name: str) -> None:
    # The schemas refer to each other as #/components/schemas/<name>, as in the OpenAPI document.
    document = {"components": {"schemas": OPENAI_SCHEMAS}, **OPENAI_SCHEMAS[name]}
    jsonschema.validate(instance, document)


REPLY: list[CompletionEvent] = [Delta("Par"), Delta("is"), Finished(FinishReason.STOP, 7, 2, None)]


async def test_a_whole_reply_is_one_chat_completion_object() -> None:
    conversations = FakeConversations(REPLY)
    [data] = await bodies(conversations, body(max_completion_tokens=5, temperature=0.5, seed=3))
    reply = json.loads(data)
    validate(reply, "openai.ChatCompletion")
    assert reply["choices"][0]["message"]["content"] == "Paris"
    assert reply["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert conversations.asked == [("alice", [PromptMessage("user", "hi")], SamplingOptions(5, 0.5, None, 3))]


async def test_streamed_chunks_match_the_schema_and_end_in_done() -> None:
    events = await bodies(FakeConversations(REPLY), body(stream=True, stream_options={"include_usage": True}))
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "openai.ChatCompletionChunk")
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "Par"},
        {"content": "is"},
        {},
    ]
    assert chunks[-1]["usage"]["total_tokens"] == 9


async def test_a_failure_after_the_stream_started_is_an_error_event_without_done() -> None:
    conversations = FakeConversations([Delta("Par")], Unavailable("the engine went away"))
    events = await bodies(conversations, body(stream=True))
    last = json.loads(events[-1][6:])
    validate(last, "openai.Error")
    assert last["error"]["code"] == "unavailable"
    assert last["error"]["type"] == "server_error"
    assert b"[DONE]" not in b"".join(events)


async def test_a_refusal_before_the_first_token_is_the_calls_status() -> None:
    conversations = FakeConversations([], ResourceExhausted("the engine is full", 0.5))
    with pytest.raises(ResourceExhausted):
        await bodies(conversations, body(stream=True))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tools": []}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"max_tokens": "many"}, "body"),
        ({"messages": [{"role": "user", "content": "hi", "audio": {}}]}, "audio"),
    ],
)
def test_fields_the_request_lacks_or_mistypes_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        read_request(body(**fields))
    assert raised.value.field == field


def test_content_parts_are_joined_and_numbers_read_as_integers() -> None:
    request = read_request(
        body(
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
            max_tokens=8,
        )
    )
    assert request.max_tokens == 8
    assert request.messages[0].content.list_value.values[1].struct_value.fields["text"].string_value == "b"


def test_a_body_over_the_limit_is_refused_before_any_of_it_is_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def converted(*args: object, **kwargs: object) -> None:
        raise AssertionError("the body was converted before its size was checked")

    monkeypatch.setattr(json_format, "MessageToDict", converted)
    large = body(messages=[{"role": "user", "content": "x" * 5000}])
    with pytest.raises(InvalidArgument) as raised:
        read_request(large, max_bytes=4096)
    assert raised.value.field == "body"
    assert f"is {large.ByteSize()} bytes" in raised.value.problem and "at most 4096" in raised.value.problem


async def test_a_body_over_the_limit_is_refused_by_the_servicer_before_any_of_it_is_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openai_api, "_convert", lambda body: pytest.fail("converted"))
    token = auth._current_user.set("alice")
    try:
        servicer = OpenAIServicer(FakeConversations(REPLY), created=1, max_body_bytes=4096)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument) as raised:
            async for _ in servicer.CreateChatCompletion(body(user="x" * 5000), None):
                pass
    finally:
        auth._current_user.reset(token)
    assert raised.value.field == "body"


async def test_a_large_body_is_converted_off_the_event_loop_and_a_small_one_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[int] = []
    convert = openai_api._convert

    def recorded(body: struct_pb2.Struct) -> Any:
        threads.append(threading.get_ident())
        return convert(body)

    monkeypatch.setattr(openai_api, "_convert", recorded)
    small = body()
    large = body(messages=[{"role": "user", "content": "x"}] * 500)
    assert small.ByteSize() <= openai_api.INLINE_CONVERSION_BYTES < large.ByteSize()
    for request in (small, large):
        [data] = await bodies(FakeConversations(REPLY), request)
        assert json.loads(data)["object"] == "chat.completion"
    loop_thread = threading.get_ident()
    assert threads[0] == loop_thread
    assert threads[1] != loop_thread


async def test_the_model_named_answers_and_every_reply_carries_its_name() -> None:
    conversations = FakeConversations(REPLY)
    [data] = await bodies(conversations, body(model="small", max_tokens=4))
    events = await bodies(conversations, body(model="small", stream=True))
    assert conversations.models_asked == ["small", "small"]
    assert json.loads(data)["model"] == "small"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"small"}


async def test_max_tokens_is_checked_against_the_named_models_context() -> None:
    with pytest.raises(InvalidArgument) as raised:
        await bodies(FakeConversations(REPLY), body(model="small", max_tokens=1024))
    assert raised.value.field == "max_tokens"
    [data] = await bodies(FakeConversations(REPLY), body(model="tiny", max_tokens=1024))
    assert json.loads(data)["object"] == "chat.completion"


@pytest.mark.parametrize(("model", "error"), [("gpt-4o", NotFound), ("", InvalidArgument)])
async def test_a_model_that_is_not_served_names_the_ones_that_are(model: str, error: type[Exception]) -> None:
    conversations = FakeConversations(REPLY)
    with pytest.raises(error) as raised:
        await bodies(conversations, body(model=model))
    assert "'tiny', 'small'" in str(raised.value) and "GET /v1/models" in str(raised.value)
    assert conversations.asked == []


async def test_models_lists_every_served_model_the_default_first() -> None:
    token = auth._current_user.set("alice")
    try:
        servicer = OpenAIServicer(FakeConversations(REPLY), created=1)  # type: ignore[arg-type]
        reply = await servicer.ListModels(pb.ListModelsRequest(), None)
    finally:
        auth._current_user.reset(token)
    assert [(m.id, m.object, m.created, m.owned_by) for m in reply.data] == [
        ("tiny", "model", 1, "chatmesh"),
        ("small", "model", 1, "chatmesh"),
    ]
