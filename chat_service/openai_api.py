"""gRPC servicer of chatmesh.openai.v1.OpenAIService: the OpenAI Chat Completions API over `Conversations`.

The gateway transcodes `POST /v1/chat/completions` and `GET /v1/models` to these methods. A completion
request arrives as a Struct and is read into `CreateChatCompletionRequest` here, rejecting the fields it
does not declare (the transcoder would drop them silently), so an OpenAI feature chatmesh lacks is a 400,
never ignored; completions leave as `google.api.HttpBody` holding exactly the
bytes OpenAI sends: a `chat.completion` JSON object, or `chat.completion.chunk` server-sent events ending
in `data: [DONE]`. Errors before the first byte are the call's status (the gateway renders OpenAI's
`{"error": {...}}` body); an error after the stream started is an `error` event, as OpenAI sends it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeAlias

from google.api.httpbody_pb2 import HttpBody
from google.protobuf import json_format, struct_pb2

from chat_service import validation as check
from chat_service.conversations import CompletionEvent, Conversations, Delta, Finished
from chat_service.domain import FinishReason
from chat_service.inference import EngineInfo, PromptMessage, PromptRole, SamplingOptions, ServedModels
from chatmesh.common.auth import current_user
from chatmesh.common.errors import OPENAI_ERROR_TYPES, ChatmeshError, InvalidArgument, NotFound
from chatmesh.openai.v1 import openai_pb2 as pb
from chatmesh.openai.v1 import openai_pb2_grpc

Context: TypeAlias = Any

_ROLES: dict[str, PromptRole] = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
    "user": "user",
    "assistant": "assistant",
}
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
SSE_CONTENT_TYPE = "text/event-stream"
JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """A checked `CreateChatCompletionRequest`."""

    engine: EngineInfo
    """The served model it names: the one that answers, and the `model` of every reply."""
    messages: Sequence[PromptMessage]
    sampling: SamplingOptions
    stream: bool
    include_usage: bool


def _text(value: struct_pb2.Value, field: str) -> str:
    """A message's `content`: a string, or an array of text parts (joined)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        parts = []
        for index, part in enumerate(value.list_value.values):
            fields = part.struct_value.fields if part.WhichOneof("kind") == "struct_value" else None
            if fields is None or fields.get("type", struct_pb2.Value()).string_value != "text":
                raise InvalidArgument(
                    f"{field}[{index}]", 'only text parts ({"type": "text", "text": "..."}) are supported'
                )
            parts.append(fields["text"].string_value if "text" in fields else "")
        return "".join(parts)
    raise InvalidArgument(field, "must be a string or an array of text parts")


_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""The largest body (as the Struct it arrives in) read into a request by default."""

INLINE_CONVERSION_BYTES = 4 * 1024
"""Bodies up to this size are converted on the event loop (a typical question: well under a
millisecond); larger ones on a worker thread. The conversion is pure Python: about 2 KiB a millisecond
for a body of many small values (a long conversation), so a body at the limit would hold the loop for
a second."""


def _checked_size(body: struct_pb2.Struct, max_bytes: int) -> int:
    # ByteSize is computed in C by the protobuf runtime: cheap next to the pure-Python conversion, which
    # is what an oversized body would otherwise cost.
    size = body.ByteSize()
    if size > max_bytes:
        raise InvalidArgument("body", f"is {size} bytes; this server reads at most {max_bytes}")
    return size


def read_request(
    body: struct_pb2.Struct, max_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> pb.CreateChatCompletionRequest:
    """The request `body` holds; a body over `max_bytes` (checked before anything is converted), a
    field the message lacks (an OpenAI feature chatmesh does not have) or a value of the wrong type is
    an `InvalidArgument` naming it."""
    _checked_size(body, max_bytes)
    return _convert(body)


async def read_request_off_loop(
    body: struct_pb2.Struct, max_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> pb.CreateChatCompletionRequest:
    """`read_request` for a coroutine: a body over `INLINE_CONVERSION_BYTES` is converted on a worker
    thread, so that one large request does not hold up every other call the event loop serves."""
    if _checked_size(body, max_bytes) <= INLINE_CONVERSION_BYTES:
        return _convert(body)
    return await asyncio.to_thread(_convert, body)


def _convert(body: struct_pb2.Struct) -> pb.CreateChatCompletionRequest:
    request = pb.CreateChatCompletionRequest()
    try:
        json_format.ParseDict(json_format.MessageToDict(body), request)
    except json_format.ParseError as exc:
        unknown = _UNKNOWN_FIELD.search(str(exc))
        if unknown:
            raise InvalidArgument(
                unknown.group(1),
                "is not supported by this server (chatmesh implements text chat completions: model,"
                " messages, stream, stream_options, max_tokens, max_completion_tokens, temperature,"
                " top_p, seed, n, stop, presence_penalty, frequency_penalty, logprobs, user)",
            ) from None
        raise InvalidArgument("body", str(exc).splitlines()[0][:300]) from None
    return request


def served_model(request: pb.CreateChatCompletionRequest, models: ServedModels) -> EngineInfo:
    """The served model `request.model` names: required (OpenAI has no default model), and one that is
    not served is `NotFound` (404, OpenAI's `model_not_found` case) naming the ones that are."""
    served = ", ".join(repr(name) for name in models.names)
    if not request.model:
        raise InvalidArgument("model", f"is required; the models served are {served} (GET /v1/models)")
    if request.model not in models.names:
        raise NotFound(
            f"model {request.model[:100]!r} does not exist; the models served are {served} (GET /v1/models)"
        )
    return models.resolve(request.model)


def completion_call(request: pb.CreateChatCompletionRequest, models: ServedModels) -> CompletionCall:
    """Check `request` against what chatmesh and the model it names can do; every error names its
    field."""
    engine = served_model(request, models)
    messages = _messages(request)
    _reject_unsupported(request)
    max_tokens_field, max_tokens = _max_tokens(request)
    seed = request.seed if request.HasField("seed") else None
    if seed is not None and seed < 0:
        raise InvalidArgument("seed", f"must not be negative, got {seed}")
    sampling = check.sampling_options(
        max_tokens,
        request.temperature if request.HasField("temperature") else None,
        request.top_p if request.HasField("top_p") else None,
        seed,
        engine.context_length,
        max_tokens_field,
    )
    return CompletionCall(
        engine, messages, sampling, stream=request.stream, include_usage=request.stream_options.include_usage
    )


def _messages(request: pb.CreateChatCompletionRequest) -> list[PromptMessage]:
    if not request.messages:
        raise InvalidArgument("messages", "must hold at least one message")
    messages = []
    for index, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidArgument(
                f"messages[{index}].role",
                f"must be system, developer, user or assistant, got {message.role[:40]!r}"
                " (tools are not supported)",
            )
        text = _text(message.content, f"messages[{index}].content")
        messages.append(
            PromptMessage(
                role, check.bounded_text(text, f"messages[{index}].content", check.MAX_CONTENT_CHARS)
            )
        )
    if messages[-1].role != "user":
        raise InvalidArgument(f"messages[{len(messages) - 1}].role", "the last message must be the user's")
    check.content(messages[-1].content, f"messages[{len(messages) - 1}].content")
    return messages


def _reject_unsupported(request: pb.CreateChatCompletionRequest) -> None:
    """Fields OpenAI has and chatmesh cannot honour: accepted only with their neutral value."""
    if request.HasField("n") and request.n != 1:
        raise InvalidArgument("n", f"only 1 choice per request is supported, got {request.n}")
    if request.HasField("stop") and request.stop.WhichOneof("kind") != "null_value":
        raise InvalidArgument("stop", "stop sequences are not supported; leave it out or null")
    for name in ("presence_penalty", "frequency_penalty"):
        if request.HasField(name) and getattr(request, name) != 0:
            raise InvalidArgument(name, "is not supported; leave it out or 0")
    if request.HasField("logprobs") and request.logprobs:
        raise InvalidArgument("logprobs", "is not supported; leave it out or false")
    if request.HasField("stream_options") and not request.stream:
        raise InvalidArgument("stream_options", "is only allowed when stream is true")


def _max_tokens(request: pb.CreateChatCompletionRequest) -> tuple[str, int | None]:
    """(the field that set it, the reply's token limit): `max_completion_tokens` or its older name."""
    given = {
        name: getattr(request, name)
        for name in ("max_completion_tokens", "max_tokens")
        if request.HasField(name)
    }
    if len(set(given.values())) > 1:
        raise InvalidArgument("max_tokens", "differs from max_completion_tokens; send one of them")
    for name, value in given.items():
        return name, int(value)
    return "max_tokens", None


def _usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _event(payload: dict[str, Any] | str) -> HttpBody:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return HttpBody(content_type=SSE_CONTENT_TYPE, data=f"data: {data}\n\n".encode())


def error_object(error: ChatmeshError) -> dict[str, Any]:
    """OpenAI's error object for `error`."""
    return {
        "message": error.message,
        "type": OPENAI_ERROR_TYPES.get(error.status_code, "server_error"),
        "param": getattr(error, "field", None),
        "code": error.status_code.name.lower(),
    }


class OpenAIServicer(openai_pb2_grpc.OpenAIServiceServicer):
    """Maps OpenAIService RPCs onto `Conversations`; identity comes from the auth interceptor."""

    def __init__(
        self,
        conversations: Conversations,
        created: int | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._conversations = conversations
        self._created = int(time.time()) if created is None else created
        self._max_body_bytes = max_body_bytes

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        current_user()
        models = [
            pb.Model(id=name, object="model", created=self._created, owned_by="chatmesh")
            for name in self._conversations.models.names
        ]
        return pb.ListModelsResponse(object="list", data=models)

    async def CreateChatCompletion(
        self, request: struct_pb2.Struct, context: Context
    ) -> AsyncIterator[HttpBody]:
        user = current_user()
        models = self._conversations.models
        call = completion_call(await read_request_off_loop(request, self._max_body_bytes), models)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        # The model that answers, by its served name (the request's, checked above).
        base = {"id": completion_id, "created": created, "model": call.engine.model}
        events = self._conversations.answer(
            user, call.messages, call.sampling, completion_id, model=call.engine.model
        )
        async with aclosing(events):
            replies = _chunks(events, base, call.include_usage) if call.stream else _whole(events, base)
            async with aclosing(replies):
                async for reply in replies:
                    yield reply


async def _whole(
    events: AsyncIterator[CompletionEvent], base: dict[str, Any]
) -> AsyncGenerator[HttpBody, None]:
    """The reply as one `chat.completion` object (`stream: false`)."""
    pieces: list[str] = []
    async for event in events:
        if isinstance(event, Delta):
            pieces.append(event.text)
        elif isinstance(event, Finished):
            body = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                        "logprobs": None,
                        "finish_reason": _FINISH.get(event.finish_reason, "stop"),
                    }
                ],
                "usage": _usage(event),
                "system_fingerprint": None,
            }
            yield HttpBody(content_type=JSON_CONTENT_TYPE, data=json.dumps(body).encode())


async def _chunks(
    events: AsyncIterator[CompletionEvent], base: dict[str, Any], include_usage: bool
) -> AsyncGenerator[HttpBody, None]:
    """The reply as server-sent `chat.completion.chunk` events, ending with `[DONE]` (`stream: true`)."""
    chunk: dict[str, Any] = {**base, "object": "chat.completion.chunk", "system_fingerprint": None}
    if include_usage:
        chunk["usage"] = None  # as OpenAI: null in every chunk but the last

    def choice(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        return {
            **chunk,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    announced = False
    try:
        async for event in events:
            if not announced:
                # Sent once the engine has taken the request: a refusal before it (engine full,
                # prompt too long) is still the call's status, a 429/400 rather than an event.
                announced = True
                yield _event(choice({"role": "assistant", "content": ""}, None))
            if isinstance(event, Delta):
                yield _event(choice({"content": event.text}, None))
            elif isinstance(event, Finished):
                yield _event(choice({}, _FINISH.get(event.finish_reason, "stop")))
                if include_usage:
                    yield _event({**chunk, "choices": [], "usage": _usage(event)})
    except ChatmeshError as exc:
        if not announced:
            raise
        yield _event({"error": error_object(exc)})
        return
    yield _event("[DONE]")
