"""MicroBatcher with a fake encoder: merging, ordering, error isolation, size cap, cancel, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from chatmesh.common.errors import Unavailable
from embedding_service.batcher import MicroBatcher
from embedding_service.encoder import Vectors


class FakeEncoder:
    """Encodes text "<n>" as the vector [n, 0, 0]; records every batch; optionally slow or failing.

    A text containing "boom" makes its whole batch fail, like a real encoder error would.
    """

    dimension = 3
    model_name = "fake"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[str]] = []
        self.started = threading.Event()

    def encode(self, texts: list[str]) -> Vectors:
        self.batches.append(list(texts))
        self.started.set()
        time.sleep(self.delay_s)
        if any("boom" in text for text in texts):
            raise RuntimeError("encoder exploded")
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        vectors[:, 0] = [float(text.split("-")[0]) for text in texts]
        return vectors


def ids(vectors: Vectors) -> list[int]:
    """Decode FakeEncoder vectors back to the numbers they encode."""
    return [int(v) for v in vectors[:, 0]]


async def wait_until_encoding(encoder: FakeEncoder) -> None:
    """Return once the encoder thread has started a batch."""
    await asyncio.to_thread(encoder.started.wait, 5)


async def test_concurrent_calls_share_one_encode_call() -> None:
    encoder = FakeEncoder()
    async with MicroBatcher(encoder, max_batch_size=32, max_wait_ms=200) as batcher:
        results = await asyncio.gather(*(batcher.embed([str(i)]) for i in range(32)))
    assert len(encoder.batches) == 1, "32 simultaneous single-text calls should make one batch"
    assert [ids(r) for r in results] == [[i] for i in range(32)]
    assert (batcher.stats.requests, batcher.stats.batches, batcher.stats.texts) == (32, 1, 32)


async def test_requests_arriving_during_a_batch_form_the_next_one() -> None:
    encoder = FakeEncoder(delay_s=0.2)
    async with MicroBatcher(encoder, max_batch_size=64, max_wait_ms=0) as batcher:
        first = asyncio.create_task(batcher.embed(["0"]))
        await wait_until_encoding(encoder)
        # The encoder is busy with "0": these must queue up and go together as soon as it is free.
        later = [asyncio.create_task(batcher.embed([str(i)])) for i in range(1, 11)]
        await asyncio.gather(first, *later)
    assert encoder.batches == [["0"], [str(i) for i in range(1, 11)]]


async def test_a_lone_request_on_an_idle_encoder_waits_at_most_max_wait() -> None:
    encoder = FakeEncoder()
    async with MicroBatcher(encoder, max_batch_size=64, max_wait_ms=20) as batcher:
        started = time.perf_counter()
        assert ids(await batcher.embed(["7"])) == [7]
        elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"a lone request took {elapsed:.3f} s"


async def test_each_caller_gets_its_own_vectors_in_order() -> None:
    encoder = FakeEncoder(delay_s=0.01)
    requests = [[str(10 * r + i) for i in range(r % 4 + 1)] for r in range(20)]
    async with MicroBatcher(encoder, max_batch_size=16, max_wait_ms=5) as batcher:
        results = await asyncio.gather(*(batcher.embed(texts) for texts in requests))
    assert len(encoder.batches) < len(requests), "requests should have been merged"
    for texts, vectors in zip(requests, results, strict=True):
        assert vectors.shape == (len(texts), 3)
        assert ids(vectors) == [int(t) for t in texts]


async def test_a_failing_batch_fails_only_its_own_callers() -> None:
    encoder = FakeEncoder(delay_s=0.05)
    async with MicroBatcher(encoder, max_batch_size=2, max_wait_ms=50) as batcher:
        # Batches of 2 in arrival order: ["1", "2-boom"] fails, ["3", "4"] must not notice.
        outcomes = await asyncio.gather(
            *(batcher.embed([text]) for text in ["1", "2-boom", "3", "4"]), return_exceptions=True
        )
        after = await batcher.embed(["5"])
    assert encoder.batches[:2] == [["1", "2-boom"], ["3", "4"]]
    assert [type(o).__name__ for o in outcomes[:2]] == ["RuntimeError", "RuntimeError"]
    assert [ids(o) for o in outcomes[2:]] == [[3], [4]]  # type: ignore[arg-type]
    assert ids(after) == [5], "the batcher keeps working after a failed batch"
    assert batcher.stats.failed_batches == 1


async def test_batches_never_exceed_max_batch_size() -> None:
    encoder = FakeEncoder(delay_s=0.005)
    requests = [[str(100 * r + i) for i in range(r % 3 + 1)] for r in range(40)]
    async with MicroBatcher(encoder, max_batch_size=8, max_wait_ms=5) as batcher:
        results = await asyncio.gather(*(batcher.embed(texts) for texts in requests))
    assert max(len(batch) for batch in encoder.batches) <= 8
    assert sum(len(batch) for batch in encoder.batches) == sum(len(texts) for texts in requests)
    assert [ids(r) for r in results] == [[int(t) for t in texts] for texts in requests]


async def test_a_request_bigger_than_the_cap_is_encoded_alone_and_whole() -> None:
    encoder = FakeEncoder()
    async with MicroBatcher(encoder, max_batch_size=4, max_wait_ms=5) as batcher:
        big, small = await asyncio.gather(batcher.embed([str(i) for i in range(10)]), batcher.embed(["99"]))
    assert encoder.batches == [[str(i) for i in range(10)], ["99"]]
    assert ids(big) == list(range(10))
    assert ids(small) == [99]


async def test_a_cancelled_caller_is_not_encoded() -> None:
    encoder = FakeEncoder(delay_s=0.2)
    async with MicroBatcher(encoder, max_batch_size=64, max_wait_ms=0) as batcher:
        first = asyncio.create_task(batcher.embed(["1"]))
        await wait_until_encoding(encoder)
        gone = asyncio.create_task(batcher.embed(["2"]))
        kept = asyncio.create_task(batcher.embed(["3"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert ids(await first) == [1]
        assert ids(await kept) == [3]
    assert encoder.batches == [["1"], ["3"]]


async def test_exit_answers_accepted_requests_then_refuses_new_ones() -> None:
    encoder = FakeEncoder(delay_s=0.1)
    batcher = MicroBatcher(encoder, max_batch_size=2, max_wait_ms=0)
    async with batcher:
        pending = [asyncio.create_task(batcher.embed([str(i)])) for i in range(5)]
        await wait_until_encoding(encoder)
    # Leaving the block waited for all three batches rather than dropping the queued ones.
    assert all(task.done() for task in pending)
    assert [ids(task.result()) for task in pending] == [[i] for i in range(5)]
    with pytest.raises(Unavailable):
        await batcher.embed(["6"])


async def test_empty_input_needs_no_encode_call() -> None:
    encoder = FakeEncoder()
    async with MicroBatcher(encoder, max_batch_size=8, max_wait_ms=1) as batcher:
        vectors = await batcher.embed([])
    assert vectors.shape == (0, 3)
    assert encoder.batches == []
