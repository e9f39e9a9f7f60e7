"""The inference service's Prometheus metrics (GenAI server conventions where they exist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chatmesh.common.metrics import LATENCY_BUCKETS_S, TOKEN_GAP_BUCKETS_S
from inference_service.admission import AdmissionController


class InferenceMetrics:
    """Time to first token, time per output token, request duration, tokens in and out, and the
    admission controller's queue depth, running generations and rejections."""

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self._model = model
        labels = ["gen_ai_request_model"]
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from a generation's admission to its first token.",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ).labels(model)
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Mean time per output token after the first, one observation per generation.",
            labels,
            buckets=TOKEN_GAP_BUCKETS_S,
            registry=registry,
        ).labels(model)
        self._duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from a generation's admission to its end, by how it ended.",
            [*labels, "outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._tokens = Counter(
            "gen_ai_server_tokens",
            "Prompt (input) and generated (output) tokens of finished generations.",
            [*labels, "gen_ai_token_type"],
            registry=registry,
        )
        for token_type in ("input", "output"):
            self._tokens.labels(model, token_type)
        self._estimated = Counter(
            "chatmesh_inference_estimated_usage_generations",
            "Finished generations whose output token count the engine did not report and the service"
            " estimated (a Triton model without an output_length output: its text re-tokenized).",
            labels,
            registry=registry,
        ).labels(model)
        self._rejections = Counter(
            "chatmesh_inference_admission_rejections",
            "Generations refused with RESOURCE_EXHAUSTED, by reason (full: no slot and a full queue;"
            " queue_timeout: waited too long for a slot).",
            ["reason"],
            registry=registry,
        )
        for reason in ("full", "queue_timeout"):
            self._rejections.labels(reason)
        self._queue_depth = Gauge(
            "chatmesh_inference_queue_depth", "Generations waiting for a slot.", registry=registry
        )
        self._running = Gauge(
            "chatmesh_inference_running_generations", "Generations holding a slot.", registry=registry
        )

    def watch(self, admission: AdmissionController) -> None:
        """Read the queue depth and running generations from `admission` at every scrape."""
        self._queue_depth.set_function(lambda: admission.waiting)
        self._running.set_function(lambda: admission.active)

    def rejected(self, reason: str) -> None:
        """Count one admission rejection (`full` or `queue_timeout`)."""
        self._rejections.labels(reason).inc()

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
        self._duration.labels(self._model, outcome).observe(seconds)
        if first_token_s is not None:
            self.time_to_first_token.observe(first_token_s)
        if completion_tokens is None:
            return
        self._tokens.labels(self._model, "input").inc(prompt_tokens)
        self._tokens.labels(self._model, "output").inc(completion_tokens)
        if usage_estimated:
            self._estimated.inc()
        if first_token_s is not None and completion_tokens > 1:
            self.time_per_output_token.observe((seconds - first_token_s) / (completion_tokens - 1))
