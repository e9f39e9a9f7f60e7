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
from chatmesh.common.errors import (
    ChatmeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_from_rpc,
    rpc_errors,
)
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
    """One model the inference service serves."""

    model: str
    """Its name: what requests name it by (`model` of Generate, CountTokens, a chat)."""
    context_length: int
    default_max_tokens: int


class ServedModels:
    """The models the inference service serves, by name, the default (the one a request that names none
    gets) first. Loaded once at start (`wait_for_models` in chat_service/server.py): the models are the
    deployment's, fixed while it runs."""

    def __init__(self, models: Sequence[EngineInfo]) -> None:
        if not models:
            raise ValueError("an inference service serves at least one model")
        self._by_name = {info.model: info for info in models}
        if len(self._by_name) != len(models) or "" in self._by_name:
            raise ValueError(
                f"served model names must be distinct and non-empty: {[m.model for m in models]}"
            )
        self._all = tuple(models)

    @property
    def default(self) -> EngineInfo:
        """The model of a chat or request that names none."""
        return self._all[0]

    @property
    def all(self) -> tuple[EngineInfo, ...]:
        """Every served model, the default first."""
        return self._all

    @property
    def names(self) -> tuple[str, ...]:
        """The served models' names, the default first."""
        return tuple(info.model for info in self._all)

    @property
    def max_context_length(self) -> int:
        """The largest context of any served model: what a request may ask for before its model is known."""
        return max(info.context_length for info in self._all)

    def resolve(self, name: str = "") -> EngineInfo:
        """The served model `name` ("": the default); `NotFound` naming the served ones otherwise."""
        if not name:
            return self.default
        info = self._by_name.get(name)
        if info is None:
            raise NotFound(
                f"model {name[:100]!r} is not served here; the models served are {self._listed()}"
                " (GET /models)"
            )
        return info

    def of_chat(self, name: str) -> EngineInfo:
        """The model that answers a chat whose stored model is `name`: that model while it is served;
        the default for "" (a chat made before chats had models) and for a model the deployment no
        longer serves, as a hosted chat continues a retired model's chats with the current default
        (each reply records the model that wrote it; UpdateChat picks another)."""
        info = self._by_name.get(name)
        if info is None:
            if name:
                log.warning(
                    "a chat's model is not served any more; the default answers it",
                    extra={"model": name[:100], "default": self.default.model},
                )
            return self.default
        return info

    def _listed(self) -> str:
        return ", ".join(f"{info.model!r}" for info in self._all)

    def __repr__(self) -> str:
        return f"ServedModels({list(self.names)!r})"


class InferenceClient(Protocol):
    """What the chat service needs from an inference service. Calls name the served model they are
    for (`model`; "" is the inference service's default); one it does not serve is `NotFound`."""

    async def list_models(self) -> Sequence[EngineInfo]:
        """Every served model, the default first."""
        ...

    async def model_info(self, model: str = "") -> EngineInfo: ...

    async def count_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> int:
        """Prompt tokens `messages` occupy for `model`, template markup and reply cue included."""
        ...

    async def count_message_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> TokenCounts:
        """Prompt tokens `messages` occupy for `model`, in total and per message, in one call."""
        ...

    def generate(
        self,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        *,
        model: str,
        affinity: str | None = None,
    ) -> AsyncGenerator[str | Generated, None]:
        """Stream text pieces from `model`, then one `Generated`. Generations with the same `affinity`
        (a chat id) go to the same inference replica where there are several, to reuse its cached prompt
        prefix."""
        ...


_SERVICE_PATH = f"/{pb.DESCRIPTOR.services_by_name['InferenceService'].full_name}"
_GET_MODEL_INFO = f"{_SERVICE_PATH}/GetModelInfo"
_LIST_MODELS = f"{_SERVICE_PATH}/ListModels"
_COUNT_TOKENS = f"{_SERVICE_PATH}/CountTokens"
_GENERATE = f"{_SERVICE_PATH}/Generate"


def _to_pb(messages: Sequence[PromptMessage]) -> list[pb.Message]:
    return [pb.Message(role=_ROLES[m.role], content=m.content) for m in messages]


def _engine_info(info: pb.GetModelInfoResponse) -> EngineInfo:
    return EngineInfo(info.model, info.context_length, info.default_max_tokens)


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

    Each call has its own deadline in seconds: `model_info_timeout_s` for GetModelInfo and ListModels,
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

    async def list_models(self) -> Sequence[EngineInfo]:
        try:
            with self._calls.call(_LIST_MODELS) as metadata:
                reply = await self._stub.ListModels(
                    pb.ListModelsRequest(), timeout=self._model_info_timeout_s, metadata=metadata
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise error_from_rpc(exc, "inference service") from exc
            # An inference service from before ListModels (during a rolling upgrade) serves one model.
            return [await self.model_info()]
        return [_engine_info(info) for info in reply.models]

    async def model_info(self, model: str = "") -> EngineInfo:
        with rpc_errors("inference service"), self._calls.call(_GET_MODEL_INFO) as metadata:
            info = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(model=model), timeout=self._model_info_timeout_s, metadata=metadata
            )
        return _engine_info(info)

    async def count_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> int:
        return int((await self._count(messages, model)).prompt_tokens)

    async def count_message_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> TokenCounts:
        reply = await self._count(messages, model)
        counts = TokenCounts(reply.prompt_tokens, tuple(reply.message_tokens), reply.template_tokens)
        if len(counts.message_tokens) != len(messages):
            # An engine built before per-message counts existed leaves the field empty.
            raise Unavailable(
                f"the inference service returned {len(counts.message_tokens)} per-message token counts for"
                f" {len(messages)} messages; upgrade it to a version that reports message_tokens"
            )
        return counts

    async def _count(self, messages: Sequence[PromptMessage], model: str) -> pb.CountTokensResponse:
        with rpc_errors("inference service"), self._calls.call(_COUNT_TOKENS) as metadata:
            reply: pb.CountTokensResponse = await self._stub.CountTokens(
                pb.CountTokensRequest(messages=_to_pb(messages), model=model),
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
        model: str,
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
                pb.GenerateRequest(
                    messages=_to_pb(messages), sampling=params, request_id=request_id, model=model
                ),
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


_SKIPPED = (Unavailable, ResourceExhausted, NotFound)
"""Failures of one replica that the next may not meet: down, full, or without the call's model."""


class AffinityInferenceClient:
    """Several inference replicas behind one `InferenceClient`.

    A conversation's generations go to the replica that holds its cached prompt prefix: the replicas are
    ranked per affinity key (the chat id) by rendezvous hashing, so every turn of a chat goes to the
    same replica, and adding or losing one moves only the chats that were on it. A replica that fails
    or is full before its first event is skipped for the next in the chat's order (failover); once text
    has streamed, a failure is the caller's. Counting and model info go to any replica that answers.

    Every replica is expected to serve the same models (the deployment's); one that does not serve a
    call's model (`NotFound`, say while a rolling change of the models is under way) is skipped like one
    that is down.
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

    async def list_models(self) -> Sequence[EngineInfo]:
        return await self._first_answer(lambda client: client.list_models())

    async def model_info(self, model: str = "") -> EngineInfo:
        return await self._first_answer(lambda client: client.model_info(model))

    async def count_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> int:
        return await self._first_answer(lambda client: client.count_tokens(messages, model=model))

    async def count_message_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> TokenCounts:
        return await self._first_answer(lambda client: client.count_message_tokens(messages, model=model))

    async def _first_answer(self, call: Callable[[InferenceClient], Awaitable[_T]]) -> _T:
        failure: ChatmeshError | None = None
        for name, client in self._rotation():
            try:
                return await call(client)
            except _SKIPPED as exc:
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
        model: str,
        affinity: str | None = None,
    ) -> AsyncGenerator[str | Generated, None]:
        failure: ChatmeshError | None = None
        for name, client in self.ranked(affinity or request_id):
            stream = client.generate(messages, sampling, request_id, model=model, affinity=affinity)
            try:
                first = await anext(stream)
            except _SKIPPED as exc:
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
