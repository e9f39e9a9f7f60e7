"""llama.cpp backend: GGUF models on the CPU through llama-cpp-python. The default engine."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from llama_cpp import Llama, StoppingCriteriaList

from inference_service.backends.base import (
    Completion,
    FinishReason,
    ModelInfo,
    Prompt,
    Sampling,
    TextDelta,
    llama_cpp_seed,
)
from inference_service.backends.templated import TemplatedBackend
from inference_service.backends.text import LeadingSpaceTrimmer
from inference_service.backends.tokenizers import LlamaTokenizer
from inference_service.prompt import PromptTemplate

log = logging.getLogger(__name__)

_DONE = object()


class LlamaCppBackend(TemplatedBackend):
    """Runs generations on a pool of `llama_cpp.Llama` instances, one per concurrent generation.

    A `Llama` object is not thread-safe, so each concurrent generation gets its own instance (they share
    the memory-mapped weights). Generation runs in a worker thread and hands tokens to the event loop
    as they are sampled. Prompts are tokenized on a thread of their own, never on the event loop (a long
    history takes milliseconds, and every stream's next token waits behind the loop) and never in the
    generation pool (whose threads may all be busy with generations for seconds).
    """

    def __init__(
        self,
        instances: Sequence[Llama],
        template: PromptTemplate,
        model_name: str,
    ) -> None:
        info = ModelInfo(model=model_name, context_length=instances[0].n_ctx(), backend="llama_cpp")
        # Tokenizing reads only the vocabulary, which is safe beside a generation on the same instance.
        super().__init__(info, template, LlamaTokenizer(instances[0]), "llama-tokenize")
        self._pool: asyncio.Queue[Llama] = asyncio.Queue()
        for llm in instances:
            self._pool.put_nowait(llm)
        self._executor = ThreadPoolExecutor(max_workers=len(instances), thread_name_prefix="llama")

    async def generate(
        self, prompt: Prompt, sampling: Sampling
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        llm = await self._pool.get()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        work = loop.run_in_executor(self._executor, _generate_blocking, llm, prompt, sampling, emit, cancel)
        # The instance goes back to the pool only once the worker thread has let go of it, whatever
        # happens to this coroutine.
        work.add_done_callback(lambda _: self._pool.put_nowait(llm))
        work.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            done = False
            while not done:
                pieces = [await queue.get()]
                # When the consumer falls behind, send what has piled up as one message rather than
                # paying per-message overhead for each token; never waits for more.
                while not queue.empty():
                    pieces.append(queue.get_nowait())
                if pieces[-1] is _DONE:
                    pieces.pop()
                    done = True
                if pieces:
                    yield TextDelta(text="".join(pieces))  # type: ignore[arg-type]
            yield await work
        finally:
            cancel.set()
            if not work.done():
                # Closed early (client cancelled): wait for the worker to notice, at most a token or two.
                await asyncio.shield(work)

    async def aclose(self) -> None:
        self._tokenizer_thread.close(wait=True)
        self._executor.shutdown(wait=True, cancel_futures=True)


def _generate_blocking(
    llm: Llama,
    prompt: Prompt,
    sampling: Sampling,
    emit: Callable[[str], None],
    cancel: threading.Event,
) -> Completion:
    """Run one generation on the calling (worker) thread, emitting text as it is produced."""
    prompt_len = prompt.token_count
    generated = 0

    def should_stop(input_ids: npt.NDArray[np.intc], _logits: npt.NDArray[np.single]) -> bool:
        # Called once per sampled token, before that token joins `input_ids`: the cheapest place to
        # count tokens (the end-of-turn token included) and to honour a cancel.
        nonlocal generated
        generated = len(input_ids) - prompt_len + 1
        return cancel.is_set()

    seed = llama_cpp_seed(sampling.seed) if sampling.seed is not None else None
    if seed is not None:
        llm.set_seed(seed)
    trimmer = LeadingSpaceTrimmer()
    finish = FinishReason.STOP
    stream: Any = llm.create_completion(
        list(prompt.token_ids),
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=list(sampling.stop),
        seed=seed,
        stream=True,
        stopping_criteria=StoppingCriteriaList([should_stop]),
    )
    try:
        for chunk in stream:
            choice = chunk["choices"][0]
            if text := trimmer.feed(choice["text"]):
                emit(text)
            if choice["finish_reason"] == "length":
                finish = FinishReason.LENGTH
            if cancel.is_set():
                finish = FinishReason.CANCELLED
                break
    finally:
        stream.close()
    return Completion(finish_reason=finish, prompt_tokens=prompt_len, completion_tokens=generated)


@asynccontextmanager
async def open_llama_cpp_backend(
    gguf_path: Path,
    *,
    instances: int,
    context_length: int,
    threads: int | None,
    batch_threads: int | None,
    template: PromptTemplate,
    model_name: str,
) -> AsyncIterator[LlamaCppBackend]:
    """Load the model (`instances` copies sharing mmap'd weights) and close it on exit."""
    if not await asyncio.to_thread(gguf_path.is_file):
        raise FileNotFoundError(
            f"GGUF model not found at {gguf_path}; set CHATMESH_INFERENCE_GGUF_PATH to a .gguf file"
        )
    cores = os.cpu_count() or 1
    # llama.cpp's worker threads spin while they wait for each other, so a generation thread that the
    # event loop or another service preempts stalls the whole token: leave a core free for them.
    n_threads = threads or max(1, (cores - 1) // instances)
    n_threads_batch = batch_threads or max(1, cores // instances)
    log.info(
        "loading model (takes a few seconds)",
        extra={"path": str(gguf_path), "instances": instances, "context_length": context_length},
    )
    started = time.perf_counter()
    llms = [
        await asyncio.to_thread(
            Llama,
            model_path=str(gguf_path),
            n_ctx=context_length,
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            verbose=False,
        )
        for _ in range(instances)
    ]
    log.info(
        "model loaded",
        extra={
            "seconds": round(time.perf_counter() - started, 2),
            "threads": n_threads,
            "batch_threads": n_threads_batch,
        },
    )
    backend = LlamaCppBackend(llms, template, model_name)
    try:
        yield backend
    finally:
        await backend.aclose()
        for llm in llms:
            llm.close()
