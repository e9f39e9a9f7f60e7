"""gRPC servicer of chatmesh.inference.v1.InferenceService."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeAlias

from opentelemetry import trace

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from inference_service.admission import AdmissionController
from inference_service.backends.base import Completion, FinishReason, InferenceBackend
from inference_service.metrics import InferenceMetrics
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
    """Validates requests, applies admission control and relays the backend's stream."""

    def __init__(
        self,
        backend: InferenceBackend,
        admission: AdmissionController,
        settings: InferenceSettings,
        metrics: InferenceMetrics,
    ):
        self._backend = backend
        self._admission = admission
        self._settings = settings
        self._metrics = metrics

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        turns = parse_turns(request.messages)
        self._admission.check()
        prompt = await self._backend.prepare(turns)
        sampling = parse_sampling(
            request.sampling,
            prompt,
            self._backend.info,
            self._settings.default_max_tokens,
            self._backend.default_stop,
            self._settings.max_stop_sequences,
            self._settings.max_stop_chars,
        )
        span = trace.get_current_span()  # the call's server span when tracing is on; else a no-op
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": self._backend.info.model,
                "gen_ai.request.max_tokens": sampling.max_tokens,
                "gen_ai.usage.input_tokens": prompt.token_count,
            }
        )
        async with self._admission.slot():
            started = time.perf_counter()
            first_token_s: float | None = None
            outcome = "cancelled"
            completion_tokens: int | None = None
            usage_estimated = False
            try:
                # aclosing: a client that goes away closes this generator at a yield; the engine must
                # stop now, not when the backend generator is garbage-collected.
                async with aclosing(self._backend.generate(prompt, sampling)) as events:
                    async for event in events:
                        if isinstance(event, Completion):
                            outcome = event.finish_reason.value
                            completion_tokens = event.completion_tokens
                            usage_estimated = event.usage_estimated
                            yield pb.GenerateResponse(
                                finished=pb.Finished(
                                    finish_reason=_FINISH_REASONS[event.finish_reason],
                                    usage=pb.Usage(
                                        # The preamble is the template's, not the caller's text.
                                        prompt_tokens=event.prompt_tokens - prompt.preamble_tokens,
                                        completion_tokens=event.completion_tokens,
                                    ),
                                )
                            )
                        else:
                            if first_token_s is None:
                                first_token_s = time.perf_counter() - started
                            # A model can emit NUL (a byte-fallback token); PostgreSQL text cannot
                            # store it, so the reply would stream and then fail to be saved.
                            text = event.text.replace("\x00", "\ufffd")
                            yield pb.GenerateResponse(delta=pb.Delta(text=text))
            except Exception:
                outcome = "error"
                raise
            finally:
                seconds = time.perf_counter() - started
                span.set_attribute("gen_ai.response.finish_reasons", [outcome])
                if completion_tokens is not None:
                    span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
                self._metrics.generation_ended(
                    outcome, seconds, first_token_s, prompt.token_count, completion_tokens, usage_estimated
                )
                log.info(
                    "generation ended",
                    extra={
                        "request_id": request.request_id,
                        "outcome": outcome,
                        "prompt_tokens": prompt.token_count,
                        "ttft_ms": None if first_token_s is None else round(first_token_s * 1000, 1),
                        "seconds": round(seconds, 3),
                    },
                )

    async def CountTokens(self, request: pb.CountTokensRequest, context: Context) -> pb.CountTokensResponse:
        prompt = await self._backend.prepare(parse_turns(request.messages))
        return pb.CountTokensResponse(
            prompt_tokens=prompt.token_count,
            message_tokens=prompt.message_tokens,
            template_tokens=prompt.template_tokens,
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        info = self._backend.info
        return pb.GetModelInfoResponse(
            model=info.model,
            context_length=info.context_length,
            backend=info.backend,
            default_max_tokens=self._settings.default_max_tokens,
        )
