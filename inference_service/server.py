"""Composition root of the inference service: settings -> one engine per served model -> servicer -> serve
until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry

from chatmesh.common.logs import configure_logging
from chatmesh.common.metrics import serve_metrics
from chatmesh.common.server import add_health_and_reflection, create_server, serve_until_signal
from chatmesh.common.tracing import open_tracing
from chatmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from chatmesh.models.store import ModelStore
from inference_service.admission import AdmissionController
from inference_service.backends.base import InferenceBackend
from inference_service.engines import Engine, Engines, ModelSetup, engine_threads, model_setup
from inference_service.metrics import InferenceMetrics
from inference_service.servicer import InferenceServicer
from inference_service.settings import InferenceSettings

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


@asynccontextmanager
async def open_backend(
    settings: InferenceSettings, setup: ModelSetup, threads: tuple[int, int]
) -> AsyncIterator[InferenceBackend]:
    """Open the engine for one served model (`setup`) on the backend the settings choose, with
    (generation, prompt) `threads` for llama.cpp; imports are local so each engine's deps stay optional."""
    if settings.backend == "triton":
        from inference_service.backends.triton import open_triton_backend

        tokenizer = settings.triton_tokenizer or setup.gguf
        assert tokenizer is not None  # model_setup finds the GGUF when no tokenizer is configured
        async with open_triton_backend(settings, setup.template, setup.name, tokenizer) as triton_backend:
            yield triton_backend
        return
    assert setup.gguf is not None  # the llama.cpp backends always have the model's file
    if settings.backend == "llama_server":
        from inference_service.backends.llama_server import open_llama_server_backend

        async with open_llama_server_backend(
            setup.gguf,
            parallel=settings.concurrency,
            context_length=settings.context_length,
            threads=threads[0],
            batch_threads=threads[1],
            template=setup.template,
            model_name=setup.name,
            log_dir=settings.run_dir,
        ) as server_backend:
            yield server_backend
        return
    from inference_service.backends.llama_cpp import open_llama_cpp_backend

    async with open_llama_cpp_backend(
        setup.gguf,
        instances=settings.concurrency,
        context_length=settings.context_length,
        # In process, the backend divides the threads among its instances itself.
        threads=settings.threads,
        batch_threads=settings.batch_threads,
        template=setup.template,
        model_name=setup.name,
    ) as llama_backend:
        yield llama_backend


@asynccontextmanager
async def open_engines(
    settings: InferenceSettings, metrics: InferenceMetrics, store: ModelStore
) -> AsyncIterator[Engines]:
    """Every served model's engine, started together, stopped together on exit.

    Every model's file is checked first (all of them, before any engine starts: a partial download is a
    `ModelFileError` naming it, not a crash halfway through starting the others); then the engines load
    at once (each `llama-server` reads its own file)."""
    served = settings.served_models()
    setups = await asyncio.gather(
        *(asyncio.to_thread(model_setup, model, settings, store) for model in served)
    )
    threads = engine_threads(settings, len(setups))
    log.info(
        "serving models",
        extra={
            "models": [setup.name for setup in setups],
            "threads": threads[0],
            "batch_threads": threads[1],
        },
    )
    async with contextlib.AsyncExitStack() as stack:
        opened = await asyncio.gather(
            *(stack.enter_async_context(open_backend(settings, setup, threads)) for setup in setups),
            return_exceptions=True,
        )
        failed = [result for result in opened if isinstance(result, BaseException)]
        if failed:
            raise failed[0]  # the stack stops the engines that did start
        engines = []
        for setup, backend in zip(setups, opened, strict=True):
            assert not isinstance(backend, BaseException)
            model_metrics = metrics.model(setup.name)
            admission = AdmissionController(
                settings.concurrency,
                settings.max_queue,
                settings.queue_timeout_s,
                on_reject=model_metrics.rejected,
            )
            model_metrics.watch(admission)
            engines.append(Engine(setup.name, backend, admission, model_metrics))
        yield Engines(engines)


async def serve(settings: InferenceSettings) -> None:
    """Run the inference service until SIGTERM/SIGINT."""
    configure_logging("inference", settings.log_level, settings.log_format)
    # The generation thread needs the GIL back after every token (sampling, detokenizing) while the
    # event loop holds it to send the previous one; Python's default 5 ms switch interval would let
    # the loop keep it for far longer than a token takes.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    log.info("starting", extra={"backend": settings.backend, "address": settings.address})
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry, [model.name for model in settings.served_models()])
    async with (
        open_tracing("inference", settings.otlp_endpoint) as tracing,
        open_engines(settings, metrics, ModelStore()) as engines,
        serve_metrics(registry, settings.metrics_address),
    ):
        server = create_server(tracing_interceptors=tracing.server_interceptors())
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(engines, settings), server
        )
        health = add_health_and_reflection(server, [SERVICE_NAME])
        server.add_insecure_port(settings.address)
        await serve_until_signal(server, health, [SERVICE_NAME], settings.shutdown_grace_s)
