"""AdmissionController: bounded concurrency, bounded queue, rejection with a retry hint."""

from __future__ import annotations

import asyncio

import pytest

from chatmesh.common.errors import ResourceExhausted
from inference_service.admission import AdmissionController
from tests.support.waiting import until


async def test_admits_up_to_max_active_then_queues_then_rejects() -> None:
    rejections: list[str] = []
    admission = AdmissionController(
        max_active=1, max_queued=1, queue_timeout_s=5, on_reject=rejections.append
    )
    release = asyncio.Event()
    order: list[str] = []

    async def hold(name: str) -> None:
        async with admission.slot():
            order.append(name)
            await release.wait()

    admission.check()  # room: no refusal
    first = asyncio.create_task(hold("first"))
    await until(lambda: admission.active == 1)
    admission.check()  # the queue still has room
    second = asyncio.create_task(hold("second"))
    await until(lambda: admission.waiting == 1)
    assert (admission.active, admission.waiting) == (1, 1)

    # Full house: refused up front (before a prompt is prepared) and by slot() alike.
    with pytest.raises(ResourceExhausted):
        admission.check()
    with pytest.raises(ResourceExhausted) as rejected:
        async with admission.slot():
            pass
    assert rejected.value.retry_after_s > 0
    assert rejections == ["full", "full"]

    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert (admission.active, admission.waiting) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue() -> None:
    admission = AdmissionController(max_active=1, max_queued=1, queue_timeout_s=5)
    release = asyncio.Event()

    async def hold() -> None:
        async with admission.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    await until(lambda: admission.active == 1)
    waiter = asyncio.create_task(hold())
    await until(lambda: admission.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.waiting == 0
    release.set()
    await holder
    async with admission.slot():
        assert admission.active == 1


async def test_queue_timeout_is_resource_exhausted() -> None:
    rejections: list[str] = []
    admission = AdmissionController(
        max_active=1, max_queued=1, queue_timeout_s=0.05, on_reject=rejections.append
    )
    release = asyncio.Event()

    async def hold() -> None:
        async with admission.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    await until(lambda: admission.active == 1)
    with pytest.raises(ResourceExhausted, match="waited"):
        async with admission.slot():
            pass
    assert rejections == ["queue_timeout"]
    release.set()
    await holder
