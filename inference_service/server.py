"""Composition root of the inference service: settings -> backend -> servicer -> serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry

from chatmesh.common.logs import configure_logging
from chatmesh.common.metrics import serve_metrics
from chatmesh.common.server import add_health_and_reflection, create_server, serve_until_signal
from chatmesh.common.tracing import open_tracing
from chatmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from inference_service.admission import AdmissionController
from inference_service.backends.base import InferenceBackend
from inference_service.chat_template import resolve_template
from inference_service.metrics import InferenceMetrics
from inference_service.model_files import resolve_gguf, resolve_tokenizer
from inference_service.servicer import InferenceServicer
from inference_service.settings import InferenceSettings

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def _model_gguf(settings: InferenceSettings) -> Path:
    """The GGUF whose chat template "auto" looks for: the model's (or for Triton, its tokenizer's)."""
    if settings.backend == "triton":
        return resolve_tokenizer(settings.triton_tokenizer, settings.gguf_path)
    return resolve_gguf(settings.gguf_path)


@asynccontextmanager
async def open_backend(settings: InferenceSettings) -> AsyncIterator[InferenceBackend]:
    """Open the backend chosen in settings; imports are local so each engine's deps stay optional."""
    template = await asyncio.to_thread(
        resolve_template, settings.prompt_template, settings.template(), _model_gguf(settings)
    )
    if settings.backend == "triton":
        from inference_service.backends.triton import open_triton_backend

        async with open_triton_backend(settings, template) as triton_backend:
            yield triton_backend
        return
    gguf_path = await asyncio.to_thread(resolve_gguf, settings.gguf_path)
    if settings.backend == "llama_server":
        from inference_service.backends.llama_server import open_llama_server_backend

        async with open_llama_server_backend(
            gguf_path,
            parallel=settings.concurrency,
            context_length=settings.context_length,
            threads=settings.threads,
            batch_threads=settings.batch_threads,
            template=template,
            model_name=settings.model_name,
            log_dir=settings.run_dir,
        ) as server_backend:
            yield server_backend
        return
    from inference_service.backends.llama_cpp import open_llama_cpp_backend

    async with open_llama_cpp_backend(
        gguf_path,
        instances=settings.concurrency,
        context_length=settings.context_length,
        threads=settings.threads,
        batch_threads=settings.batch_threads,
        template=template,
        model_name=settings.model_name,
    ) as llama_backend:
        yield llama_backend


async def serve(settings: InferenceSettings) -> None:
    """Run the inference service until SIGTERM/SIGINT."""
    configure_logging("inference", settings.log_level, settings.log_format)
    # The generation thread needs the GIL back after every token (sampling, detokenizing) while the
    # event loop holds it to send the previous one; Python's default 5 ms switch interval would let
    # the loop keep it for far longer than a token takes.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    log.info("starting", extra={"backend": settings.backend, "address": settings.address})
    registry = CollectorRegistry()
    async with (
        open_tracing("inference", settings.otlp_endpoint) as tracing,
        open_backend(settings) as backend,
        serve_metrics(registry, settings.metrics_address),
    ):
        metrics = InferenceMetrics(registry, backend.info.model)
        admission = AdmissionController(
            settings.concurrency, settings.max_queue, settings.queue_timeout_s, on_reject=metrics.rejected
        )
        metrics.watch(admission)
        server = create_server(tracing_interceptors=tracing.server_interceptors())
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(backend, admission, settings, metrics), server
        )
        health = add_health_and_reflection(server, [SERVICE_NAME])
        server.add_insecure_port(settings.address)
        await serve_until_signal(server, health, [SERVICE_NAME], settings.shutdown_grace_s)
