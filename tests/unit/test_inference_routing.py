"""The inference servicer serving several models: each request goes to the engine of the model it names,
on fake engines that say which one answered."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import pytest
from prometheus_client import CollectorRegistry

from chatmesh.common.errors import NotFound
from chatmesh.inference.v1 import inference_pb2 as pb
from inference_service.admission import AdmissionController
from inference_service.backends.base import Completion, FinishReason, ModelInfo, Prompt, Sampling, TextDelta
from inference_service.engines import Engine, Engines
from inference_service.metrics import InferenceMetrics
from inference_service.prompt import Turn
from inference_service.servicer import InferenceServicer
from inference_service.settings import InferenceSettings

HI = [pb.Message(role=pb.ROLE_USER, content="hi")]


class NamedBackend:
    """An engine that answers with its model's name; its prompts have `tokens` tokens."""

    def __init__(self, model: str, tokens: int, context_length: int) -> None:
        self.info = ModelInfo(model=model, context_length=context_length, backend="fake")
        self.default_stop: tuple[str, ...] = ()
        self._tokens = tokens

    async def prepare(self, turns: Sequence[Turn]) -> Prompt:
        return Prompt(text="", token_ids=list(range(self._tokens)), message_tokens=[self._tokens - 1])

    async def generate(
        self, prompt: Prompt, sampling: Sampling
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        yield TextDelta(text=self.info.model)
        yield Completion(FinishReason.STOP, prompt.token_count, 1)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def servicer(registry: CollectorRegistry) -> InferenceServicer:
    metrics = InferenceMetrics(registry, ["alpha", "beta"])
    engines = []
    for name, tokens, context in (("alpha", 5, 512), ("beta", 7, 1024)):
        admission = AdmissionController(1, 0, 1.0, on_reject=metrics.model(name).rejected)
        metrics.model(name).watch(admission)
        backend = NamedBackend(name, tokens, context)
        engines.append(Engine(name, backend, admission, metrics.model(name)))  # type: ignore[arg-type]
    return InferenceServicer(Engines(engines), InferenceSettings(models="gemma-3-270m"))


async def reply(servicer: InferenceServicer, model: str) -> tuple[str, int]:
    """(text, prompt tokens) of a generation with `model`."""
    text, prompt_tokens = "", -1
    async for event in servicer.Generate(pb.GenerateRequest(messages=HI, model=model), None):
        if event.HasField("delta"):
            text += event.delta.text
        else:
            prompt_tokens = event.finished.usage.prompt_tokens
    return text, prompt_tokens


async def test_each_request_goes_to_the_engine_of_its_model_and_no_model_means_the_first(
    servicer: InferenceServicer,
) -> None:
    assert await reply(servicer, "beta") == ("beta", 7)
    assert await reply(servicer, "alpha") == ("alpha", 5)
    assert await reply(servicer, "") == ("alpha", 5)
    counted = await servicer.CountTokens(pb.CountTokensRequest(messages=HI, model="beta"), None)
    assert (counted.prompt_tokens, list(counted.message_tokens)) == (7, [6])
    info = await servicer.GetModelInfo(pb.GetModelInfoRequest(model="beta"), None)
    assert (info.model, info.context_length) == ("beta", 1024)
    assert (await servicer.GetModelInfo(pb.GetModelInfoRequest(), None)).model == "alpha"


async def test_list_models_describes_every_model_the_default_first(servicer: InferenceServicer) -> None:
    listed = await servicer.ListModels(pb.ListModelsRequest(), None)
    assert [(m.model, m.context_length, m.backend) for m in listed.models] == [
        ("alpha", 512, "fake"),
        ("beta", 1024, "fake"),
    ]


async def test_a_model_not_served_is_not_found_naming_the_served_ones(servicer: InferenceServicer) -> None:
    served = "model 'gamma' is not served here; served: alpha, beta"
    with pytest.raises(NotFound, match=served):
        await reply(servicer, "gamma")
    with pytest.raises(NotFound, match=served):
        await servicer.CountTokens(pb.CountTokensRequest(messages=HI, model="gamma"), None)
    with pytest.raises(NotFound, match=served):
        await servicer.GetModelInfo(pb.GetModelInfoRequest(model="gamma"), None)


async def test_every_series_is_labelled_with_the_model_that_served_it(
    servicer: InferenceServicer, registry: CollectorRegistry
) -> None:
    await reply(servicer, "beta")

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("gen_ai_server_tokens_total", gen_ai_request_model="beta", gen_ai_token_type="input") == 7
    assert sample("gen_ai_server_tokens_total", gen_ai_request_model="alpha", gen_ai_token_type="input") == 0
    assert sample("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="beta") == 1
    assert sample("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="alpha") == 0
    assert sample("chatmesh_inference_queue_depth", gen_ai_request_model="alpha") == 0
    assert sample("chatmesh_inference_running_generations", gen_ai_request_model="beta") == 0
    rejections = "chatmesh_inference_admission_rejections_total"
    assert sample(rejections, gen_ai_request_model="alpha", reason="full") == 0
