"""gRPC servicer of chatmesh.inference.v1.InferenceService."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from opentelemetry import trace

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from inference_service.backends.base import (
    Completion,
    FinishReason,
    InferenceBackend,
    Prompt,
    Sampling,
    TextDelta,
)
from inference_service.engines import Engine, Engines
from inference_service.settings import InferenceSettings
from inference_service.validation import parse_sampling, parse_turns

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}

# grpc.aio.ServicerContext; grpcio ships no type information.
Context: TypeAlias = Any


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Routes each request to the engine of the model it names, validates it, applies that engine's
    admission control and relays its stream."""

    def __init__(self, engines: Engines, settings: InferenceSettings):
        self._engines = engines
        self._settings = settings

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = self._engines.get(request.model)
        turns = parse_turns(request.messages)
        engine.admission.check()
        prompt = await engine.backend.prepare(turns)
        sampling = self._sampling(engine.backend, request, prompt)
        span = trace.get_current_span()  # the call's server span when tracing is on; else a no-op
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": engine.name,
                "gen_ai.response.model": engine.name,
                "gen_ai.request.max_tokens": sampling.max_tokens,
                "gen_ai.usage.input_tokens": prompt.token_count,
            }
        )
        async with engine.admission.slot():
            run = _Run()
            try:
                # aclosing: a client that goes away closes this generator at a yield; the engine must
                # stop now, not when the backend generator is garbage-collected.
                async with aclosing(engine.backend.generate(prompt, sampling)) as events:
                    async for event in events:
                        if isinstance(event, Completion):
                            run.outcome = event.finish_reason.value
                            run.completion_tokens = event.completion_tokens
                            run.usage_estimated = event.usage_estimated
                        elif run.first_token_s is None:
                            run.first_token_s = time.perf_counter() - run.started
                        yield _response(event, prompt)
            except Exception:
                run.outcome = "error"
                raise
            finally:
                self._ended(engine, run, span, prompt, request.request_id)

    def _sampling(self, backend: InferenceBackend, request: pb.GenerateRequest, prompt: Prompt) -> Sampling:
        """The request's sampling, checked, with the server's defaults and limits and the model's stops."""
        return parse_sampling(
            request.sampling,
            prompt,
            backend.info,
            self._settings.default_max_tokens,
            backend.default_stop,
            self._settings.max_stop_sequences,
            self._settings.max_stop_chars,
        )

    def _ended(self, engine: Engine, run: _Run, span: trace.Span, prompt: Prompt, request_id: str) -> None:
        """Record a generation that ended, however it ended: on its span, in the model's metrics, in the
        log."""
        seconds = time.perf_counter() - run.started
        span.set_attribute("gen_ai.response.finish_reasons", [run.outcome])
        if run.completion_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", run.completion_tokens)
        engine.metrics.generation_ended(
            run.outcome,
            seconds,
            run.first_token_s,
            prompt.token_count,
            run.completion_tokens,
            run.usage_estimated,
        )
        log.info(
            "generation ended",
            extra={
                "request_id": request_id,
                "model": engine.name,
                "outcome": run.outcome,
                "prompt_tokens": prompt.token_count,
                "ttft_ms": None if run.first_token_s is None else round(run.first_token_s * 1000, 1),
                "seconds": round(seconds, 3),
            },
        )

    async def CountTokens(self, request: pb.CountTokensRequest, context: Context) -> pb.CountTokensResponse:
        engine = self._engines.get(request.model)
        prompt = await engine.backend.prepare(parse_turns(request.messages))
        return pb.CountTokensResponse(
            prompt_tokens=prompt.token_count,
            message_tokens=prompt.message_tokens,
            template_tokens=prompt.template_tokens,
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        return self._model_info(self._engines.get(request.model))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(engine) for engine in self._engines])

    def _model_info(self, engine: Engine) -> pb.GetModelInfoResponse:
        info = engine.backend.info
        return pb.GetModelInfoResponse(
            model=engine.name,
            context_length=info.context_length,
            backend=info.backend,
            default_max_tokens=self._settings.default_max_tokens,
        )


@dataclass
class _Run:
    """What one generation did so far, for its span, metrics and log line when it ends."""

    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    outcome: str = "cancelled"
    completion_tokens: int | None = None
    usage_estimated: bool = False


def _response(event: TextDelta | Completion, prompt: Prompt) -> pb.GenerateResponse:
    """The wire form of one backend event."""
    if isinstance(event, Completion):
        return pb.GenerateResponse(
            finished=pb.Finished(
                finish_reason=_FINISH_REASONS[event.finish_reason],
                usage=pb.Usage(
                    # The preamble is the template's, not the caller's text.
                    prompt_tokens=event.prompt_tokens - prompt.preamble_tokens,
                    completion_tokens=event.completion_tokens,
                ),
            )
        )
    # A model can emit NUL (a byte-fallback token); PostgreSQL text cannot store it, so the reply would
    # stream and then fail to be saved.
    return pb.GenerateResponse(delta=pb.Delta(text=event.text.replace("\x00", "\ufffd")))
