"""Client side of the inference service, as the chat service needs it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import grpc

from chat_service.domain import FinishReason
from chatmesh.common.errors import Unavailable, rpc_errors
from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc

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
class EngineInfo:
    """What the inference service serves."""

    model: str
    context_length: int
    default_max_tokens: int


class InferenceClient(Protocol):
    """What the chat service needs from an inference engine."""

    async def model_info(self) -> EngineInfo: ...

    async def count_tokens(self, messages: Sequence[PromptMessage]) -> int: ...

    def generate(
        self, messages: Sequence[PromptMessage], sampling: SamplingOptions, request_id: str
    ) -> AsyncGenerator[str | Generated, None]:
        """Stream text pieces, then one `Generated`."""
        ...


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
    `count_timeout_s` for CountTokens and `generate_timeout_s` for a whole Generate stream.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        model_info_timeout_s: float = 10.0,
        count_timeout_s: float = 30.0,
        generate_timeout_s: float = 600.0,
    ) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._model_info_timeout_s = model_info_timeout_s
        self._count_timeout_s = count_timeout_s
        self._generate_timeout_s = generate_timeout_s

    async def model_info(self) -> EngineInfo:
        with rpc_errors("inference service"):
            info = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._model_info_timeout_s)
        return EngineInfo(info.model, info.context_length, info.default_max_tokens)

    async def count_tokens(self, messages: Sequence[PromptMessage]) -> int:
        with rpc_errors("inference service"):
            reply = await self._stub.CountTokens(
                pb.CountTokensRequest(messages=_to_pb(messages)), timeout=self._count_timeout_s
            )
        return int(reply.prompt_tokens)

    async def generate(
        self, messages: Sequence[PromptMessage], sampling: SamplingOptions, request_id: str
    ) -> AsyncGenerator[str | Generated, None]:
        params = pb.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        call = self._stub.Generate(
            pb.GenerateRequest(messages=_to_pb(messages), sampling=params, request_id=request_id),
            timeout=self._generate_timeout_s,
        )
        try:
            with rpc_errors("inference service"):
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
