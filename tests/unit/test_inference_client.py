"""GrpcInferenceClient against an in-process fake engine that finishes with a given finish reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from chat_service.domain import FinishReason
from chat_service.inference import EngineInfo, Generated, GrpcInferenceClient, PromptMessage, SamplingOptions
from chatmesh.common.errors import Unavailable
from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc


class FinishingEngine(inference_pb2_grpc.InferenceServiceServicer):
    """Sends one delta, then finishes with `finish_reason` (any number, as a newer engine might)."""

    def __init__(self, finish_reason: int) -> None:
        self.finish_reason = finish_reason
        self.models: list[str] = []

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.models.append(request.model)
        yield pb.GenerateResponse(delta=pb.Delta(text="Hi"))
        finished = pb.Finished(usage=pb.Usage(prompt_tokens=3, completion_tokens=1))
        finished.finish_reason = self.finish_reason  # type: ignore[assignment]
        yield pb.GenerateResponse(finished=finished)


class OneModelEngine(inference_pb2_grpc.InferenceServiceServicer):
    """An inference service from before ListModels: it describes its one model, and nothing more."""

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(model="old", context_length=2048, default_max_tokens=64)


@asynccontextmanager
async def client_of(
    servicer: inference_pb2_grpc.InferenceServiceServicer,
) -> AsyncIterator[GrpcInferenceClient]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield GrpcInferenceClient(channel, generate_timeout_s=30)
    finally:
        await server.stop(None)


async def generate_with(finish_reason: int, model: str = "") -> list[str | Generated]:
    async with client_of(FinishingEngine(finish_reason)) as client:
        stream = client.generate(
            [PromptMessage("user", "hello")], SamplingOptions(), "request-1", model=model
        )
        return [event async for event in stream]


async def test_a_generation_names_its_model() -> None:
    engine = FinishingEngine(pb.FINISH_REASON_STOP)
    async with client_of(engine) as client:
        stream = client.generate([PromptMessage("user", "hi")], SamplingOptions(), "r", model="smol")
        assert [e async for e in stream][:1] == ["Hi"]
    assert engine.models == ["smol"]


async def test_an_inference_service_without_list_models_serves_its_one_model() -> None:
    async with client_of(OneModelEngine()) as client:
        assert await client.list_models() == [EngineInfo("old", 2048, 64)]


async def test_a_known_finish_reason_is_passed_on() -> None:
    events = await generate_with(pb.FINISH_REASON_LENGTH)
    assert events == ["Hi", Generated(FinishReason.LENGTH, 3, 1)]


@pytest.mark.parametrize(("value", "named"), [(0, "FINISH_REASON_UNSPECIFIED"), (42, "42")])
async def test_an_unknown_finish_reason_is_unavailable_naming_it(value: int, named: str) -> None:
    with pytest.raises(Unavailable, match="unknown finish reason") as raised:
        await generate_with(value)
    assert named in raised.value.message
