"""The interface every inference engine implements, and the values that cross it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from inference_service.prompt import Turn


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a backend serves."""

    model: str
    context_length: int
    backend: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """A conversation rendered by the backend's template and tokenized by its tokenizer.

    `token_ids` is the special prefix (BOS), the template's preamble and default system turn (when the
    conversation has no system message), each message's tokens in order, then the generation cue's
    tokens; `message_tokens` says how many of them each message has (the rest are template tokens).
    `preamble_tokens` of them are the preamble's and default system turn's, which the caller never
    wrote: counted for the context window, left out of the usage reported to users.
    """

    text: str
    token_ids: Sequence[int]
    message_tokens: Sequence[int] = ()
    preamble_tokens: int = 0

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    @property
    def template_tokens(self) -> int:
        """Tokens that belong to no message: the special prefix, the preamble and the generation cue."""
        return len(self.token_ids) - sum(self.message_tokens)


@dataclass(frozen=True, slots=True)
class Sampling:
    """Validated sampling parameters; `stop` already includes the template's stop sequences."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


def llama_cpp_seed(seed: int) -> int:
    """`seed` (the contract's uint64) as llama.cpp's 32-bit seed, still reproducible.

    llama.cpp keeps the low 32 bits of a seed and reads 0xFFFFFFFF as "choose a random seed", so 2^32 - 1
    and 2^64 - 1 sampled differently on every call. Seeds below 2^32 - 1 pass as they are; the others are
    folded onto them (modulo 2^32 - 1)."""
    return seed % 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class TextDelta:
    """More generated text."""

    text: str


@dataclass(frozen=True, slots=True)
class Completion:
    """The end of a generation: always the last item a backend yields."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool = False
    """`completion_tokens` was not reported by the engine but estimated (see the Triton backend)."""


class InferenceBackend(Protocol):
    """A text-generation engine.

    `generate` must stream: yield each piece of text as soon as the engine produces it. Closing the
    iterator early (the caller was cancelled) must stop the engine within a token or two, and the
    iterator's cleanup must not return before the engine has stopped using the generation slot.
    """

    @property
    def info(self) -> ModelInfo: ...

    @property
    def default_stop(self) -> tuple[str, ...]:
        """Stop sequences of the prompt template, always applied."""
        ...

    async def prepare(self, turns: Sequence[Turn]) -> Prompt:
        """Render and tokenize a conversation exactly as `generate` will send it, message by message
        (see `tokenizers.tokenize_prompt`), off the event loop."""
        ...

    def generate(self, prompt: Prompt, sampling: Sampling) -> AsyncGenerator[TextDelta | Completion, None]:
        """Stream the reply: `TextDelta`s, then exactly one `Completion`."""
        ...
