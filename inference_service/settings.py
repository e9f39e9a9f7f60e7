"""Typed settings of the inference service, read from `CHATMESH_INFERENCE_*` environment variables."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from chatmesh.common.service_settings import InferenceServiceSettings
from chatmesh.models.catalog import CATALOG, DEFAULT_MODEL
from chatmesh.models.served import ServedModel, parse_served_models
from inference_service.prompt import PREAMBLES, TEMPLATES, PromptTemplate


class InferenceSettings(InferenceServiceSettings):
    """Everything the inference service can be configured with: the settings `chatmesh run` sets or reads
    (address, backend and admission: `InferenceServiceSettings`, in the shared runtime), and these."""

    model_name: str = Field(
        "gemma-3-270m", description="the name GGUF_PATH's model is served under when MODELS is empty"
    )
    prompt_template: Literal["auto", "transcript", "gemma", "chatml"] = Field(
        "auto",
        description="auto: the GGUF's own chat template (tokenizer.chat_template) when it carries one,"
        " else the transcript; or one of the built-in templates",
    )
    prompt_preamble: Literal["none", "few-shot"] = Field(
        "few-shot",
        description="text before every conversation: few-shot shows a base model (transcript template)"
        " an instruction and two worked examples (2x the bare transcript's accuracy with the bundled model,"
        " benchmarks/answer_quality.py); counted in the context window, not in reported usage",
    )

    # Admission control (with max_concurrent and max_queue): how long a request waits for a slot.
    queue_timeout_s: float = Field(30.0, gt=0, description="longest a request waits for a slot")

    default_max_tokens: int = Field(256, ge=1)
    max_stop_sequences: int = 8
    max_stop_chars: int = 64

    # llama.cpp backend.
    gguf_path: Path | None = Field(None, description="GGUF model file; default: the bundled Gemma 3 270M")
    context_length: int = Field(4096, ge=128)
    threads: int | None = Field(
        None,
        description="CPU threads per engine while streaming tokens; default: all cores but one, shared"
        " by the concurrent generations and divided among the served models' engines, at least one each"
        " (see docs/benchmarks.md: a spare core for the event loop, gRPC and the other services beats one"
        " more llama.cpp thread)",
    )
    batch_threads: int | None = Field(
        None, description="CPU threads per engine for prompt processing; default: all cores"
    )

    # Triton backend (deploy/triton's TensorRT-LLM ensemble, sent the prompt as token ids).
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "ensemble"
    triton_tokenizer: Path | None = Field(
        None,
        description="the model's tokenizer (the prompt goes to Triton as its token ids): a HF tokenizer.json"
        " or a GGUF file with the same vocabulary; default as gguf_path",
    )
    triton_end_id: int | None = Field(
        None,
        description="the token id that ends a generation (TensorRT-LLM's end_id); default: the tokenizer's"
        " end-of-sequence token (a GGUF's, or eos_token in the tokenizer_config.json beside tokenizer.json)",
    )
    triton_timeout_s: float = 600.0

    run_dir: Path = Field(Path(".run"), description="where llama-server's log goes")

    @model_validator(mode="before")
    @classmethod
    def _no_transcript_examples_for_chat_templates(cls, data: Any) -> Any:
        # The few-shot default is written in the transcript's format; a chat template goes without.
        if (
            isinstance(data, dict)
            and "prompt_preamble" not in data
            and data.get("prompt_template")
            not in (
                None,
                "transcript",
            )
        ):
            return {**data, "prompt_preamble": "none"}
        return data

    @model_validator(mode="after")
    def _models_are_readable(self) -> InferenceSettings:
        served = self.served_models()  # raises ServedModelsError (a ValueError) naming the bad entry
        if self.backend == "triton" and len(served) > 1:
            raise ValueError(
                f"CHATMESH_INFERENCE_MODELS names {len(served)} models; the triton backend serves one (its"
                " TRITON_MODEL): run one inference service per Triton model"
            )
        return self

    def served_models(self) -> list[ServedModel]:
        """The models to serve, the default first: `models` parsed; when empty, `gguf_path` under
        `model_name` if set, else the catalog's default model."""
        served = parse_served_models(self.models, variable="CHATMESH_INFERENCE_MODELS")
        if served:
            return served
        if self.gguf_path is not None:
            return [ServedModel(self.model_name, path=self.gguf_path)]
        return [ServedModel(DEFAULT_MODEL, catalog=CATALOG[DEFAULT_MODEL])]

    @model_validator(mode="after")
    def _preamble_fits_the_template(self) -> InferenceSettings:
        if self.prompt_preamble != "none" and self.prompt_template not in ("auto", "transcript"):
            raise ValueError(
                f"CHATMESH_INFERENCE_PROMPT_PREAMBLE={self.prompt_preamble} is written for the transcript"
                f" template, not {self.prompt_template}: set it to none (a chat-tuned model needs no"
                " examples)"
            )
        return self

    def template(self) -> PromptTemplate:
        """The built-in prompt template these settings describe, preamble included (for "auto": the
        transcript, which is what a model without a chat template of its own is sent)."""
        name = "transcript" if self.prompt_template == "auto" else self.prompt_template
        return dataclasses.replace(TEMPLATES[name], preamble=PREAMBLES[self.prompt_preamble])

    gil_switch_interval_ms: float = Field(0.5, gt=0, description="Python's GIL switch interval (default 5)")
