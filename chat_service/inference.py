"""Client side of the inference service, as the chat service needs it."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import grpc

from chat_service.domain import FinishReason
from chatmesh.common.errors import ChatmeshError, ResourceExhausted, Unavailable, rpc_errors
from chatmesh.common.tracing import NO_CALL_TRACING, ClientCalls
from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

_T = TypeVar("_T")

PromptRole = Literal["system", "user", "assistant"]

_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_FINISH = {
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class PromptMessage:
    """One entry of the OpenAI-style message list sent to the engine."""

    role: PromptRole
    content: str


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Sampling knobs passed through to the engine; None takes the engine's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Generated:
    """The end of a generation."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Prompt tokens of a message list as the engine tokenizes it.

    Each message is tokenized on its own, so the prompt of any sub-list of the messages (same order)
    occupies `template_tokens` plus those messages' `message_tokens`.
    """

    prompt_tokens: int
    message_tokens: tuple[int, ...]
    """One entry per message, in order: its tokens as rendered in the prompt (role markup included)."""
    template_tokens: int
    """Tokens every prompt has whatever its messages (BOS, the reply cue)."""


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the inference service serves."""

    model: str
    context_length: int
    default_max_tokens: int


class InferenceClient(Protocol):
    """What the chat service needs from an inference engine."""

    async def model_info(self) -> EngineInfo: ...

    async def count_tokens(self, messages: Sequence[PromptMessage]) -> int:
        """Prompt tokens `messages` occupy, template markup and reply cue included."""
        ...

    async def count_message_tokens(self, messages: Sequence[PromptMessage]) -> TokenCounts:
        """Prompt tokens `messages` occupy, in total and per message, in one call."""
        ...

    def generate(
        self,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        *,
        affinity: str | None = None,
    ) -> AsyncGenerator[str | Generated, None]:
        """Stream text pieces, then one `Generated`. Generations with the same `affinity` (a chat id) go
        to the same engine replica where there are several, to reuse its cached prompt prefix."""
        ...


_SERVICE_PATH = f"/{pb.DESCRIPTOR.services_by_name['InferenceService'].full_name}"
_GET_MODEL_INFO = f"{_SERVICE_PATH}/GetModelInfo"
_COUNT_TOKENS = f"{_SERVICE_PATH}/CountTokens"
_GENERATE = f"{_SERVICE_PATH}/Generate"


def _to_pb(messages: Sequence[PromptMessage]) -> list[pb.Message]:
    return [pb.Message(role=_ROLES[m.role], content=m.content) for m in messages]


def _finish_reason(value: pb.FinishReason) -> FinishReason:
    """The engine's finish reason; one this client does not know is the engine's fault, not a STOP."""
    reason = _FINISH.get(value)
    if reason is None:
        name = pb.FinishReason.Name(value) if value in pb.FinishReason.values() else "not in the API"
        raise Unavailable(
            f"the inference service finished with an unknown finish reason {value} ({name});"
            " its API version may not match this chat service's"
        )
    return reason


class GrpcInferenceClient:
    """`InferenceClient` over gRPC; failures surface as domain errors (`Unavailable`, ...).

    Each call has its own deadline in seconds: `model_info_timeout_s` for GetModelInfo,
    `count_timeout_s` for CountTokens and `generate_timeout_s` for a whole Generate stream. `calls`
    traces them (`Tracing.client_calls()`; none by default).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        model_info_timeout_s: float = 10.0,
        count_timeout_s: float = 30.0,
        generate_timeout_s: float = 600.0,
        calls: ClientCalls = NO_CALL_TRACING,
    ) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._calls = calls
        self._model_info_timeout_s = model_info_timeout_s
        self._count_timeout_s = count_timeout_s
        self._generate_timeout_s = generate_timeout_s

    async def model_info(self) -> EngineInfo:
        with rpc_errors("inference service"), self._calls.call(_GET_MODEL_INFO) as metadata:
            info = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self._model_info_timeout_s, metadata=metadata
            )
        return EngineInfo(info.model, info.context_length, info.default_max_tokens)

    async def count_tokens(self, messages: Sequence[PromptMessage]) -> int:
        return int((await self._count(messages)).prompt_tokens)

    async def count_message_tokens(self, messages: Sequence[PromptMessage]) -> TokenCounts:
        reply = await self._count(messages)
        counts = TokenCounts(reply.prompt_tokens, tuple(reply.message_tokens), reply.template_tokens)
        if len(counts.message_tokens) != len(messages):
            # An engine built before per-message counts existed leaves the field empty.
            raise Unavailable(
                f"the inference service returned {len(counts.message_tokens)} per-message token counts for"
                f" {len(messages)} messages; upgrade it to a version that reports message_tokens"
            )
        return counts

    async def _count(self, messages: Sequence[PromptMessage]) -> pb.CountTokensResponse:
        with rpc_errors("inference service"), self._calls.call(_COUNT_TOKENS) as metadata:
            reply: pb.CountTokensResponse = await self._stub.CountTokens(
                pb.CountTokensRequest(messages=_to_pb(messages)),
                timeout=self._count_timeout_s,
                metadata=metadata,
            )
        return reply

    async def generate(
        self,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        *,
        affinity: str | None = None,
    ) -> AsyncGenerator[str | Generated, None]:
        params = pb.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        with rpc_errors("inference service"), self._calls.call(_GENERATE) as metadata:
            call = self._stub.Generate(
                pb.GenerateRequest(messages=_to_pb(messages), sampling=params, request_id=request_id),
                timeout=self._generate_timeout_s,
                metadata=metadata,
            )
            try:
                async for event in call:
                    if event.HasField("delta"):
                        yield event.delta.text
                    else:
                        usage = event.finished.usage
                        yield Generated(
                            _finish_reason(event.finished.finish_reason),
                            usage.prompt_tokens,
                            usage.completion_tokens,
                        )
            finally:
                # Closing this iterator early (our client went away) must stop the engine too.
                call.cancel()


class AffinityInferenceClient:
    """Several inference replicas behind one `InferenceClient`.

    A conversation's generations go to the replica that holds its cached prompt prefix: the replicas are
    ranked per affinity key (the chat id) by rendezvous hashing, so every turn of a chat goes to the
    same replica, and adding or losing one moves only the chats that were on it. A replica that fails
    or is full before its first event is skipped for the next in the chat's order (failover); once text
    has streamed, a failure is the caller's. Counting and model info go to any replica that answers.
    """

    def __init__(self, replicas: Sequence[tuple[str, InferenceClient]]) -> None:
        if not replicas:
            raise ValueError("at least one inference replica is needed")
        self._replicas = list(replicas)
        self._next = 0

    def ranked(self, key: str) -> list[tuple[str, InferenceClient]]:
        """The replicas in the order a generation with affinity `key` tries them."""

        def weight(name: str) -> bytes:
            return hashlib.sha256(f"{key}|{name}".encode()).digest()

        return sorted(self._replicas, key=lambda replica: weight(replica[0]), reverse=True)

    def _rotation(self) -> list[tuple[str, InferenceClient]]:
        # Unkeyed calls spread over the replicas, each trying the others when its first choice fails.
        self._next = (self._next + 1) % len(self._replicas)
        return self._replicas[self._next :] + self._replicas[: self._next]

    async def model_info(self) -> EngineInfo:
        return await self._first_answer(lambda client: client.model_info())

    async def count_tokens(self, messages: Sequence[PromptMessage]) -> int:
        return await self._first_answer(lambda client: client.count_tokens(messages))

    async def count_message_tokens(self, messages: Sequence[PromptMessage]) -> TokenCounts:
        return await self._first_answer(lambda client: client.count_message_tokens(messages))

    async def _first_answer(self, call: Callable[[InferenceClient], Awaitable[_T]]) -> _T:
        failure: ChatmeshError | None = None
        for name, client in self._rotation():
            try:
                return await call(client)
            except (Unavailable, ResourceExhausted) as exc:
                log.warning("inference replica failed; trying the next", extra={"replica": name})
                failure = exc
        assert failure is not None
        raise failure

    async def generate(
        self,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        *,
        affinity: str | None = None,
    ) -> AsyncGenerator[str | Generated, None]:
        failure: ChatmeshError | None = None
        for name, client in self.ranked(affinity or request_id):
            stream = client.generate(messages, sampling, request_id, affinity=affinity)
            try:
                first = await anext(stream)
            except (Unavailable, ResourceExhausted) as exc:
                await stream.aclose()
                log.warning(
                    "inference replica failed before streaming; trying the next", extra={"replica": name}
                )
                failure = exc
                continue
            except BaseException:
                await stream.aclose()
                raise
            async with aclosing(stream):
                yield first
                async for event in stream:
                    yield event
            return
        assert failure is not None
        raise failure
