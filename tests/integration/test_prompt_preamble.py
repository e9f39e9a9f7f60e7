"""The default few-shot preamble, through a real inference service with the bundled model: the README's
question answered, the preamble counted where the context window is planned and left out of the usage."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from inference_service.backends.tokenizers import open_tokenizer
from inference_service.model_files import bundled_gguf_path
from inference_service.prompt import FEW_SHOT_PREAMBLE
from tests.support.services import PARIS
from tests.support.stack import inference_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    # The default, set explicitly: the test session pins the bare transcript for every other engine.
    with inference_service(standard=False, prompt_preamble="few-shot") as service:
        async with grpc.aio.insecure_channel(service.address) as channel:
            yield inference_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]


async def test_the_readme_question_is_answered(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    text = []
    finished = None
    request = pb.GenerateRequest(messages=PARIS, sampling=pb.SamplingParams(max_tokens=24, temperature=0))
    async for event in stub.Generate(request):
        if event.HasField("delta"):
            text.append(event.delta.text)
        else:
            finished = event.finished
    reply = "".join(text)
    assert "Paris" in reply, reply
    assert finished is not None and finished.finish_reason == pb.FINISH_REASON_STOP, reply
    # The preamble is counted where a caller plans the context window, and is not the caller's usage.
    preamble = len(open_tokenizer(bundled_gguf_path()).encode(FEW_SHOT_PREAMBLE, special=True))
    counted = await stub.CountTokens(pb.CountTokensRequest(messages=PARIS))
    assert counted.template_tokens > preamble > 30
    assert finished.usage.prompt_tokens == counted.prompt_tokens - preamble
