"""Micro-batching: concurrent `embed` calls share one forward pass of the encoder.

A transformer forward pass over 32 short texts costs far less than 32 passes over one text each, so
the service merges whatever requests are waiting into one `Encoder.encode` call, run on a single worker
thread (the encoder already uses every core through torch's intra-op threads; a second encoding thread
would only make them fight).

Scheduling, in the order that keeps the encoder busy:

- while a batch encodes, new requests queue up; the moment it finishes, everything queued (up to
  `max_batch_size` texts) starts encoding, from the completion callback, before the finished batch's
  callers are woken: their response handling would otherwise delay the next forward pass;
- a request that finds the encoder idle waits at most `max_wait_ms` for companions (less once the batch
  is full), so a lone request pays only that much extra latency and a burst still shares one pass.

Under steady concurrent load the encoder therefore never idles and batches size themselves to the
load; `max_wait_ms` only shapes the first batch after a quiet spell.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import numpy as np

from chatmesh.common.errors import Unavailable
from embedding_service.encoder import Encoder, Vectors

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Request:
    texts: list[str]
    future: asyncio.Future[Vectors]
    queued_at: float


class BatchObserver(Protocol):
    """Told of every batch the encoder finished (metrics)."""

    def batch_encoded(self, texts: int, queue_waits_s: Sequence[float], seconds: float, failed: bool) -> None:
        """`texts` encoded in `seconds`; each request of the batch waited `queue_waits_s` before it."""
        ...


@dataclass(slots=True)
class BatcherStats:
    """Counters since the batcher started; `texts / batches` is the mean batch size."""

    requests: int = 0
    batches: int = 0
    texts: int = 0
    failed_batches: int = 0


class MicroBatcher:
    """Merges concurrent `embed` calls into batched `Encoder.encode` calls on one worker thread.

    Use as an async context manager: entering starts the scheduler, leaving stops taking requests,
    finishes the ones already accepted and stops the worker thread.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        self._encoder = encoder
        self._observer = observer
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._queue: deque[_Request] = deque()
        self._queued_texts = 0
        self._inflight: asyncio.Future[Vectors] | None = None
        self._wakeup = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._closed = False
        self._stats = BatcherStats()

    @property
    def stats(self) -> BatcherStats:
        """Live counters (requests, batches, texts) for logs and benchmarks."""
        return self._stats

    async def __aenter__(self) -> Self:
        if self._scheduler is not None or self._closed:
            raise RuntimeError("a MicroBatcher can be entered only once")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-encoder")
        self._scheduler = asyncio.create_task(self._schedule_when_idle(), name="embed-batcher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        scheduler, executor = self._scheduler, self._executor
        assert scheduler is not None and executor is not None, "exit without enter"
        scheduler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scheduler
        try:
            # Accepted requests are answered: the server has already drained or cancelled its calls, so
            # this is at most the batch in flight plus what queued behind it.
            while True:
                if self._inflight is None and self._queue:
                    self._dispatch()
                if self._inflight is None:
                    break
                await asyncio.wait([self._inflight])
        finally:
            # Reached with work left only if this exit was itself cancelled.
            while self._queue:
                request = self._queue.popleft()
                if not request.future.done():
                    request.future.set_exception(Unavailable("the embedding service is shutting down"))
            self._queued_texts = 0
            executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed `texts` (row i is the unit vector of `texts[i]`), batched with concurrent callers.

        Raises whatever the encoder raised for the batch this call was part of, or `Unavailable` once
        the batcher is closing.
        """
        if self._closed or self._scheduler is None or self._scheduler.done():
            raise Unavailable("the embedding batcher is not running")
        if not texts:
            return np.empty((0, self._encoder.dimension), dtype=np.float32)
        future: asyncio.Future[Vectors] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(list(texts), future, time.perf_counter()))
        self._queued_texts += len(texts)
        self._stats.requests += 1
        if log.isEnabledFor(logging.DEBUG):
            # Lets a test (or an operator) see that a call reached the batcher, e.g. before a SIGTERM.
            log.debug(
                "request queued", extra={"requests": self._stats.requests, "queued": self._queued_texts}
            )
        if self._inflight is None:
            # Only the idle-encoder path waits on this; a busy encoder picks the request up on completion.
            self._wakeup.set()
        # A cancelled caller cancels `future`; `_take_batch` then drops the request unencoded.
        return await future

    async def _schedule_when_idle(self) -> None:
        """Start a batch whenever requests wait while the encoder is idle (busy case: `_on_batch_done`)."""
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            if not self._queue or self._inflight is not None:
                await self._wakeup.wait()
                continue
            deadline = loop.time() + self._max_wait_s
            # Handlers that are already runnable (a burst delivered in one read) join without a timer.
            await asyncio.sleep(0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    while self._queued_texts < self._max_batch_size:
                        self._wakeup.clear()
                        await self._wakeup.wait()
            # Nothing else dispatches while the encoder is idle, so it is still ours to start.
            if self._inflight is None:
                self._dispatch()

    def _take_batch(self) -> list[_Request]:
        """Pop whole requests, oldest first, up to `max_batch_size` texts (a bigger request goes alone)."""
        batch: list[_Request] = []
        size = 0
        while self._queue:
            request = self._queue[0]
            if batch and size + len(request.texts) > self._max_batch_size:
                break
            self._queue.popleft()
            self._queued_texts -= len(request.texts)
            if request.future.done():  # the caller went away; do not spend a forward pass on it
                continue
            batch.append(request)
            size += len(request.texts)
        return batch

    def _dispatch(self) -> None:
        """Start encoding the next batch on the worker thread (the encoder must be idle)."""
        assert self._executor is not None
        batch = self._take_batch()
        if not batch:
            return
        texts = [text for request in batch for text in request.texts]
        started = time.perf_counter()
        inflight = asyncio.get_running_loop().run_in_executor(self._executor, self._encoder.encode, texts)
        self._inflight = inflight
        inflight.add_done_callback(functools.partial(self._on_batch_done, batch, len(texts), started))

    def _on_batch_done(
        self, batch: list[_Request], n_texts: int, started: float, inflight: asyncio.Future[Vectors]
    ) -> None:
        self._inflight = None
        # Keep the encoder busy first; waking this batch's callers can wait a forward pass's start.
        if self._queue:
            self._dispatch()
        self._stats.batches += 1
        self._stats.texts += n_texts
        error = _batch_error(inflight, n_texts)
        if self._observer is not None:
            self._observer.batch_encoded(
                n_texts,
                [started - request.queued_at for request in batch],
                time.perf_counter() - started,
                error is not None,
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch encoded",
                extra={
                    "requests": len(batch),
                    "texts": n_texts,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    "queued": self._queued_texts,
                },
            )
        if error is not None:
            self._stats.failed_batches += 1
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        vectors = inflight.result()
        offset = 0
        for request in batch:
            end = offset + len(request.texts)
            if not request.future.done():
                request.future.set_result(vectors[offset:end])
            offset = end


def _batch_error(inflight: asyncio.Future[Vectors], n_texts: int) -> BaseException | None:
    """Why a finished batch has no usable result, or None if it has one."""
    if inflight.cancelled():
        return Unavailable("the embedding batch was cancelled")
    error = inflight.exception()
    if error is not None:
        return error
    vectors = inflight.result()
    if vectors.ndim != 2 or vectors.shape[0] != n_texts:
        return RuntimeError(f"encoder returned shape {vectors.shape} for {n_texts} texts")
    return None
