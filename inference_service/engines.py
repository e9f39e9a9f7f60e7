"""The served models: each one's file and prompt template, and the engine that serves it.

A service serves one or more models (`InferenceSettings.served_models`, the default first); each has an
engine of its own (for llama_server, its own `llama-server` child process with its own slots) and its own
`AdmissionController`, so one model's crowd queues for that model's slots only. Requests name the model
(`model` in every request; empty: the default) and `Engines.get` routes them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from chatmesh.common.errors import NotFound
from chatmesh.models.served import ServedModel
from chatmesh.models.store import ModelStore
from inference_service.admission import AdmissionController
from inference_service.backends.base import InferenceBackend
from inference_service.chat_template import resolve_template
from inference_service.metrics import ModelMetrics
from inference_service.model_files import catalog_model_file, local_model_file
from inference_service.prompt import PREAMBLES, TEMPLATES, PromptTemplate
from inference_service.settings import InferenceSettings


@dataclass(frozen=True, slots=True)
class ModelSetup:
    """What an engine needs to serve one model: its name, GGUF file (for Triton, the tokenizer's GGUF or
    None when `triton_tokenizer` names one) and prompt template."""

    name: str
    gguf: Path | None
    template: PromptTemplate


def model_setup(model: ServedModel, settings: InferenceSettings, store: ModelStore) -> ModelSetup:
    """`model`'s file (a catalog model's verified against the catalog) and prompt template.

    A catalog model is prompted as its entry says: `template`, the GGUF's own chat template (transcript
    and preamble if it has no usable one); `transcript`, the transcript after the preamble setting's text
    (few-shot by default); unless PROMPT_TEMPLATE is set explicitly, which then applies to every model. A
    NAME=PATH model (or GGUF_PATH) follows the PROMPT_TEMPLATE and PROMPT_PREAMBLE settings. Blocking
    (hashes the file, reads its vocabulary): call it off the event loop. Raises `ModelFileError` for a
    missing, partial or corrupt file."""
    # Triton with a tokenizer of its own needs no GGUF here: the model runs on Triton.
    tokenizer_elsewhere = settings.backend == "triton" and settings.triton_tokenizer is not None
    gguf: Path | None = None
    if not tokenizer_elsewhere:
        if model.catalog is not None:
            gguf = catalog_model_file(model.catalog, store)
        else:
            assert model.path is not None  # a served model is a catalog entry or a path
            gguf = local_model_file(model.name, model.path)
    # Set explicitly, PROMPT_TEMPLATE applies to catalog models too (how answer_quality.py compares them).
    choice, fallback = settings.prompt_template, settings.template()
    if model.catalog is not None and "prompt_template" not in settings.model_fields_set:
        choice = "auto" if model.catalog.prompt_format == "template" else "transcript"
        fallback = dataclasses.replace(TEMPLATES["transcript"], preamble=PREAMBLES[settings.prompt_preamble])
    template = resolve_template(choice, fallback, settings.triton_tokenizer if tokenizer_elsewhere else gguf)
    if model.catalog is not None and not model.catalog.default_system_prompt:
        # Measured per model: some answer better without the system prompt their template adds.
        template = dataclasses.replace(template, default_system="")
    return ModelSetup(model.name, gguf, template)


def engine_threads(settings: InferenceSettings, engines: int) -> tuple[int, int]:
    """(generation threads, prompt-processing threads) of each of `engines` llama.cpp engines.

    The settings when given. Else generation: all cores but one (docs/benchmarks.md) divided among the
    engines, at least one each; prompts (and every step that decodes several streams at once, which
    llama.cpp runs on its batch threads too): all cores divided among the engines, at least one each.

    Why divided: llama.cpp's threads meet at a barrier after every step, so with more threads than cores
    one model's crowd preempts the other model's threads mid-step and slows every token of its users,
    and both engines lose throughput to the thrashing. Measured on 2 cores (benchmarks/multi_model.py,
    Qwen2.5-Coder 0.5B flooded by 16 users, a SmolLM2 user asking in turn): with two batch threads each,
    the SmolLM2 user's first token came 3.2x later than on the idle mesh (p90 2.9 s) and the two engines
    together made 0.70 of the flooded engine's tokens/s alone; with one each, 0.98x and 1.07. The cost:
    one engine of several gets at most its share of the cores, also when the others are idle (a single
    engine keeps them all).
    """
    cores = os.cpu_count() or 1
    threads = settings.threads or max(1, (cores - 1) // engines)
    batch_threads = settings.batch_threads or max(1, cores // engines)
    return threads, batch_threads


@dataclass(frozen=True, slots=True)
class Engine:
    """One served model: its backend (engine), its admission controller and its metrics."""

    name: str
    backend: InferenceBackend
    admission: AdmissionController
    metrics: ModelMetrics


class Engines:
    """The served models' engines by name, the default (the first) for requests that name none."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("a service serves at least one model")
        self._engines = {engine.name: engine for engine in engines}
        self.default = engines[0]

    def __iter__(self) -> Iterator[Engine]:
        """Every engine, the default first."""
        return iter(self._engines.values())

    def get(self, model: str) -> Engine:
        """The engine serving `model` ("": the default); `NotFound` naming the served models."""
        if not model:
            return self.default
        engine = self._engines.get(model)
        if engine is None:
            raise NotFound(f"model {model[:100]!r} is not served here; served: {', '.join(self._engines)}")
        return engine
