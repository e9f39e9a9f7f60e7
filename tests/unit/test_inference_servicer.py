"""The inference servicer's relay of a backend's stream, on a fake backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from chatmesh.inference.v1 import inference_pb2 as pb
from inference_service.admission import AdmissionController
from inference_service.backends.base import Completion, FinishReason, ModelInfo, Prompt, Sampling, TextDelta
from inference_service.engines import Engine, Engines
from inference_service.metrics import InferenceMetrics
from inference_service.servicer import InferenceServicer
from inference_service.settings import InferenceSettings


class NulEmittingBackend:
    """A model whose reply contains NUL, as a byte-fallback token can make one."""

    info = ModelInfo(model="fake", context_length=512, backend="fake")
    default_stop: tuple[str, ...] = ()

    async def prepare(self, turns: Sequence[Any]) -> Prompt:
        return Prompt(text="User: hi\nAssistant:", token_ids=[1, 2, 3], message_tokens=[1])

    async def generate(
        self, prompt: Prompt, sampling: Sampling
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        yield TextDelta(text="a\x00b")
        yield Completion(FinishReason.STOP, prompt.token_count, 1)


async def test_nul_in_a_reply_is_relayed_as_the_replacement_character() -> None:
    settings = InferenceSettings()
    engine = Engine(
        "fake",
        NulEmittingBackend(),  # type: ignore[arg-type]
        AdmissionController(1, 1, 1.0),
        InferenceMetrics(CollectorRegistry(), "fake").model("fake"),
    )
    servicer = InferenceServicer(Engines([engine]), settings)
    request = pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
    texts = [event.delta.text async for event in servicer.Generate(request, None) if event.HasField("delta")]
    assert texts == ["a\ufffdb"], "NUL would stream to the client and then fail to be stored on PostgreSQL"
