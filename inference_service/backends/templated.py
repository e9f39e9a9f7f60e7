"""The part every backend shares: the model it serves, its prompt template and its tokenizer thread."""

from __future__ import annotations

from collections.abc import Sequence

from inference_service.backends.base import ModelInfo, Prompt
from inference_service.backends.tokenizers import Tokenizer, TokenizerThread
from inference_service.prompt import PromptTemplate, Turn


class TemplatedBackend:
    """`info`, `default_stop` and `prepare` of `InferenceBackend`, for a backend that renders prompts with
    a `PromptTemplate` and tokenizes them here, on a `TokenizerThread` of its own (`_tokenizer_thread`).

    A subclass adds `generate` and stops the thread when it closes.
    """

    def __init__(
        self, info: ModelInfo, template: PromptTemplate, tokenizer: Tokenizer, thread_name: str = "tokenize"
    ) -> None:
        self._info = info
        self._template = template
        self._tokenizer_thread = TokenizerThread(tokenizer, template, thread_name)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def default_stop(self) -> tuple[str, ...]:
        """The template's stop sequences, always applied."""
        return self._template.stop

    async def prepare(self, turns: Sequence[Turn]) -> Prompt:
        """`turns` rendered and tokenized exactly as `generate` sends them (see `TokenizerThread`)."""
        return await self._tokenizer_thread.prompt(turns)
