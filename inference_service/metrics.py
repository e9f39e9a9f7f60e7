"""The inference service's Prometheus metrics (GenAI server conventions where they exist).

Every series carries `gen_ai_request_model`: the served model that did the work (each has its own engine,
slots and admission controller, so queue depth and rejections are per model too).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chatmesh.common.metrics import LATENCY_BUCKETS_S, TOKEN_GAP_BUCKETS_S
from inference_service.admission import AdmissionController

_MODEL = "gen_ai_request_model"


class InferenceMetrics:
    """Time to first token, time per output token, request duration, tokens in and out, and each
    admission controller's queue depth, running generations and rejections, by served model.

    `model` names the served model(s); each one's series exist from the start (at zero), and `model(name)`
    gives the metrics one engine records into."""

    def __init__(self, registry: CollectorRegistry, model: str | Sequence[str]) -> None:
        models = [model] if isinstance(model, str) else list(model)
        self._time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from a generation's admission to its first token.",
            [_MODEL],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Mean time per output token after the first, one observation per generation.",
            [_MODEL],
            buckets=TOKEN_GAP_BUCKETS_S,
            registry=registry,
        )
        self._duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from a generation's admission to its end, by how it ended.",
            [_MODEL, "outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._tokens = Counter(
            "gen_ai_server_tokens",
            "Prompt (input) and generated (output) tokens of finished generations.",
            [_MODEL, "gen_ai_token_type"],
            registry=registry,
        )
        self._estimated = Counter(
            "chatmesh_inference_estimated_usage_generations",
            "Finished generations whose output token count the engine did not report and the service"
            " estimated (a Triton model without an output_length output: its text re-tokenized).",
            [_MODEL],
            registry=registry,
        )
        self._rejections = Counter(
            "chatmesh_inference_admission_rejections",
            "Generations refused with RESOURCE_EXHAUSTED, by reason (full: no slot and a full queue;"
            " queue_timeout: waited too long for a slot).",
            [_MODEL, "reason"],
            registry=registry,
        )
        self._queue_depth = Gauge(
            "chatmesh_inference_queue_depth", "Generations waiting for a slot.", [_MODEL], registry=registry
        )
        self._running = Gauge(
            "chatmesh_inference_running_generations",
            "Generations holding a slot.",
            [_MODEL],
            registry=registry,
        )
        self._models = {name: ModelMetrics(self, name) for name in models}

    def model(self, name: str) -> ModelMetrics:
        """The metrics of the served model `name` (one of those given at construction)."""
        return self._models[name]


class ModelMetrics:
    """One served model's series of `InferenceMetrics`: what its engine's generations record."""

    def __init__(self, families: InferenceMetrics, model: str) -> None:
        self._families = families
        self.model = model
        self.time_to_first_token = families._time_to_first_token.labels(model)
        self.time_per_output_token = families._time_per_output_token.labels(model)
        self._input_tokens = families._tokens.labels(model, "input")
        self._output_tokens = families._tokens.labels(model, "output")
        self._estimated = families._estimated.labels(model)
        for reason in ("full", "queue_timeout"):
            families._rejections.labels(model, reason)

    def watch(self, admission: AdmissionController) -> None:
        """Read the queue depth and running generations from `admission` (this model's) at every scrape."""
        self._families._queue_depth.labels(self.model).set_function(lambda: admission.waiting)
        self._families._running.labels(self.model).set_function(lambda: admission.active)

    def rejected(self, reason: str) -> None:
        """Count one admission rejection (`full` or `queue_timeout`)."""
        self._families._rejections.labels(self.model, reason).inc()

    def generation_ended(
        self,
        outcome: str,
        seconds: float,
        first_token_s: float | None,
        prompt_tokens: int,
        completion_tokens: int | None,
        usage_estimated: bool = False,
    ) -> None:
        """Record one generation; `completion_tokens` None when it did not finish (cancelled, failed),
        `usage_estimated` when the engine did not report it."""
        self._families._duration.labels(self.model, outcome).observe(seconds)
        if first_token_s is not None:
            self.time_to_first_token.observe(first_token_s)
        if completion_tokens is None:
            return
        self._input_tokens.inc(prompt_tokens)
        self._output_tokens.inc(completion_tokens)
        if usage_estimated:
            self._estimated.inc()
        if first_token_s is not None and completion_tokens > 1:
            self.time_per_output_token.observe((seconds - first_token_s) / (completion_tokens - 1))
