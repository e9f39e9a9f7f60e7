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
        with rpc_errors("inference service"):
            reply: pb.CountTokensResponse = await self._stub.CountTokens(
                pb.CountTokensRequest(messages=_to_pb(messages)), timeout=self._count_timeout_s
            )
        return reply

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
