"""The stateless answer of the OpenAI-compatible API: a reply to the caller's whole conversation, stored
nowhere, through the same cache step and engine as a chat's completion."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from chat_service.cache.policy import CachedAnswer
from chat_service.conversations.cache_step import CacheStep, stateless_question
from chat_service.conversations.events import CompletionEvent, Delta, Finished
from chat_service.conversations.generation import with_default_length
from chat_service.domain import FinishReason
from chat_service.inference import (
    EngineInfo,
    Generated,
    InferenceClient,
    PromptMessage,
    SamplingOptions,
    ServedModels,
)
from chatmesh.common.errors import Unavailable


class StatelessAnswers:
    """Replies to conversations the caller keeps (the last message the user's)."""

    def __init__(self, inference: InferenceClient, models: ServedModels, cache: CacheStep) -> None:
        self._inference = inference
        self._models = models
        self._cache = cache

    def answer(
        self,
        user_id: str,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        use_cache: bool,
        model: str,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """`Delta`s from `model` ("": the default; one not served is `NotFound` naming the served), then
        one `Finished` (no message id); a failure is raised, also after text has streamed. The cache is
        the user's and the model's, keyed by the same context as a chat's question (system prompt and
        earlier turns)."""
        engine = self._models.resolve(model)
        return self._cache.answer(
            stateless_question(user_id, messages, use_cache, engine.model),
            _serve_cached,
            lambda: self._generate(engine, messages, sampling, request_id),
            model=engine.model,
        )

    async def _generate(
        self,
        engine: EngineInfo,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
    ) -> AsyncGenerator[CompletionEvent, None]:
        finished: Generated | None = None
        stream = self._inference.generate(
            messages, with_default_length(sampling, engine), request_id, model=engine.model
        )
        async with aclosing(stream):
            async for event in stream:
                if isinstance(event, Generated):
                    finished = event
                else:
                    yield Delta(event)
        if finished is None:
            raise Unavailable("the inference service ended the stream without finishing; retry")
        yield Finished(finished.finish_reason, finished.prompt_tokens, finished.completion_tokens, None)


async def _serve_cached(cached: CachedAnswer) -> AsyncGenerator[CompletionEvent, None]:
    if cached.text:
        yield Delta(cached.text)
    yield Finished(FinishReason.STOP, 0, 0, None, cached=True, cached_tokens=cached.token_count)
