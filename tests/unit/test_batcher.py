"""MicroBatcher with a fake encoder: merging, ordering, error isolation, size cap, cancel, shutdown.

No test sleeps to let something happen: a gate holds the fake encoder mid-batch for as long as a test
needs, and tests wait for the state they need (a batch started, requests queued), never for time.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from chatmesh.common.errors import Unavailable
from embedding_service.batcher import MicroBatcher
from embedding_service.encoder import Vectors
from tests.support.waiting import until

GUARD_S = 30
"""Only turns a hang into a failure; nothing is timed."""


class FakeEncoder:
    """Encodes text "<n>" as the vector [n, 0, 0]; records every batch; can be held mid-batch.

    A text containing "boom" makes its whole batch fail, like a real encoder error would. After `hold`,
    every batch waits inside `encode` until `release`.
    """

    dimension = 3
    model_name = "fake"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self._gate = threading.Event()
        self._gate.set()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def encode(self, texts: list[str]) -> Vectors:
        self.batches.append(list(texts))
        self.started.set()
        assert self._gate.wait(GUARD_S), "the test never released the encoder"
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
    assert await asyncio.to_thread(encoder.started.wait, GUARD_S), "no batch started"


async def test_concurrent_calls_share_one_encode_call() -> None:
    encoder = FakeEncoder()
    async with MicroBatcher(encoder, max_batch_size=32, max_wait_ms=200) as batcher:
        results = await asyncio.gather(*(batcher.embed([str(i)]) for i in range(32)))
    assert len(encoder.batches) == 1, "32 simultaneous single-text calls should make one batch"
    assert [ids(r) for r in results] == [[i] for i in range(32)]
    assert (batcher.stats.requests, batcher.stats.batches, batcher.stats.texts) == (32, 1, 32)


async def test_requests_arriving_during_a_batch_form_the_next_one() -> None:
    encoder = FakeEncoder()
    encoder.hold()
    async with MicroBatcher(encoder, max_batch_size=64, max_wait_ms=0) as batcher:
        first = asyncio.create_task(batcher.embed(["0"]))
        await wait_until_encoding(encoder)
        # The encoder is busy with "0": these must queue up and go together as soon as it is free.
        later = [asyncio.create_task(batcher.embed([str(i)])) for i in range(1, 11)]
        await until(lambda: batcher.stats.requests == 11)
        encoder.release()
        await asyncio.gather(first, *later)
    assert encoder.batches == [["0"], [str(i) for i in range(1, 11)]]


async def test_a_lone_request_on_an_idle_encoder_does_not_wait_for_companions() -> None:
    encoder = FakeEncoder()
    async with MicroBatcher(encoder, max_batch_size=64, max_wait_ms=20) as batcher:
        assert ids(await batcher.embed(["7"])) == [7]
    assert encoder.batches == [["7"]], "encoded alone once max_wait passed"
    # How long it waited is a latency figure: benchmarks/embedding_throughput.py measures it.


async def test_a_full_batch_on_an_idle_encoder_starts_without_waiting_out_max_wait() -> None:
    encoder = FakeEncoder()
    # An hour: were the full batch to wait for the timer, this test would hang (and time out).
    async with MicroBatcher(encoder, max_batch_size=4, max_wait_ms=3_600_000) as batcher:
        results = await asyncio.gather(*(batcher.embed([str(i)]) for i in range(4)))
    assert [ids(r) for r in results] == [[0], [1], [2], [3]]
    assert encoder.batches == [["0", "1", "2", "3"]]


async def test_each_caller_gets_its_own_vectors_in_order() -> None:
    encoder = FakeEncoder()
    requests = [[str(10 * r + i) for i in range(r % 4 + 1)] for r in range(20)]
    async with MicroBatcher(encoder, max_batch_size=16, max_wait_ms=5) as batcher:
        results = await asyncio.gather(*(batcher.embed(texts) for texts in requests))
    assert len(encoder.batches) < len(requests), "requests should have been merged"
    for texts, vectors in zip(requests, results, strict=True):
        assert vectors.shape == (len(texts), 3)
        assert ids(vectors) == [int(t) for t in texts]


async def test_a_failing_batch_fails_only_its_own_callers() -> None:
    encoder = FakeEncoder()
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
    encoder = FakeEncoder()
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
    encoder = FakeEncoder()
    encoder.hold()
    async with MicroBatcher(encoder, max_batch_size=64, max_wait_ms=0) as batcher:
        first = asyncio.create_task(batcher.embed(["1"]))
        await wait_until_encoding(encoder)
        gone = asyncio.create_task(batcher.embed(["2"]))
        kept = asyncio.create_task(batcher.embed(["3"]))
        await until(lambda: batcher.stats.requests == 3)  # both queued behind the held batch
        gone.cancel()
        encoder.release()
        assert ids(await first) == [1]
        assert ids(await kept) == [3]
    assert encoder.batches == [["1"], ["3"]]


async def test_exit_answers_accepted_requests_then_refuses_new_ones() -> None:
    encoder = FakeEncoder()
    encoder.hold()
    batcher = MicroBatcher(encoder, max_batch_size=2, max_wait_ms=0)
    await batcher.__aenter__()
    pending = [asyncio.create_task(batcher.embed([str(i)])) for i in range(5)]
    await wait_until_encoding(encoder)
    exiting = asyncio.create_task(batcher.__aexit__(None, None, None))
    await until(lambda: batcher._closed)  # the exit started: from here on it takes no new requests
    with pytest.raises(Unavailable):
        await batcher.embed(["6"])
    assert not exiting.done(), "exit waits for the batch in the encoder and those queued behind it"
    encoder.release()
    await exiting
    # Leaving waited for all three batches rather than dropping the queued ones.
    assert all(task.done() for task in pending)
    assert [ids(task.result()) for task in pending] == [[i] for i in range(5)]
    assert encoder.batches == [["0", "1"], ["2", "3"], ["4"]]


async def test_empty_input_needs_no_encode_call() -> None:
    encoder = FakeEncoder()
    async with MicroBatcher(encoder, max_batch_size=8, max_wait_ms=1) as batcher:
        vectors = await batcher.embed([])
    assert vectors.shape == (0, 3)
    assert encoder.batches == []
