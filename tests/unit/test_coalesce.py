"""Reading a stream ahead and handing over what piled up (the Triton relay's batching)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pytest

from inference_service.backends.coalesce import coalesced
from tests.support.waiting import until


async def test_an_idle_consumer_gets_each_item_alone_and_at_once() -> None:
    gates = [asyncio.Event() for _ in range(3)]

    async def source() -> AsyncGenerator[int, None]:
        for index, gate in enumerate(gates):
            await gate.wait()
            yield index

    async with aclosing(coalesced(source())) as batches:
        for index, gate in enumerate(gates):
            gate.set()
            assert await anext(batches) == [index]  # not held back for the next one
        with pytest.raises(StopAsyncIteration):
            await anext(batches)


async def test_items_that_arrive_while_the_consumer_is_busy_come_as_one_batch() -> None:
    produced: list[int] = []
    release = asyncio.Event()

    async def source() -> AsyncGenerator[int, None]:
        yield 0
        await release.wait()
        for index in range(1, 5):
            produced.append(index)
            yield index

    async with aclosing(coalesced(source())) as batches:
        assert await anext(batches) == [0]
        release.set()
        await until(lambda: len(produced) == 4)  # the consumer is "busy" meanwhile
        assert await anext(batches) == [1, 2, 3, 4]


async def test_an_error_comes_after_the_items_before_it() -> None:
    async def source() -> AsyncGenerator[int, None]:
        yield 1
        yield 2
        raise RuntimeError("engine gone")

    seen: list[int] = []
    with pytest.raises(RuntimeError, match="engine gone"):
        async for batch in coalesced(source()):
            seen.extend(batch)
    assert seen == [1, 2]


async def test_closing_stops_reading_the_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncGenerator[int, None]:
        try:
            yield 1
            await asyncio.Event().wait()  # an engine that would go on
            yield 2
        finally:
            closed.set()

    async with aclosing(coalesced(source())) as batches:
        assert await anext(batches) == [1]
    assert closed.is_set()
