"""GrpcInferenceClient against an in-process fake engine that finishes with a given finish reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from chat_service.domain import FinishReason
from chat_service.inference import Generated, GrpcInferenceClient, PromptMessage, SamplingOptions
from chatmesh.common.errors import Unavailable
from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc


class FinishingEngine(inference_pb2_grpc.InferenceServiceServicer):
    """Sends one delta, then finishes with `finish_reason` (any number, as a newer engine might)."""

    def __init__(self, finish_reason: int) -> None:
        self.finish_reason = finish_reason

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(delta=pb.Delta(text="Hi"))
        finished = pb.Finished(usage=pb.Usage(prompt_tokens=3, completion_tokens=1))
        finished.finish_reason = self.finish_reason  # type: ignore[assignment]
        yield pb.GenerateResponse(finished=finished)


async def generate_with(finish_reason: int) -> list[str | Generated]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(FinishingEngine(finish_reason), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = GrpcInferenceClient(channel, generate_timeout_s=30)
            stream = client.generate([PromptMessage("user", "hello")], SamplingOptions(), "request-1")
            return [event async for event in stream]
    finally:
        await server.stop(None)


async def test_a_known_finish_reason_is_passed_on() -> None:
    events = await generate_with(pb.FINISH_REASON_LENGTH)
    assert events == ["Hi", Generated(FinishReason.LENGTH, 3, 1)]


@pytest.mark.parametrize(("value", "named"), [(0, "FINISH_REASON_UNSPECIFIED"), (42, "42")])
async def test_an_unknown_finish_reason_is_unavailable_naming_it(value: int, named: str) -> None:
    with pytest.raises(Unavailable, match="unknown finish reason") as raised:
        await generate_with(value)
    assert named in raised.value.message
