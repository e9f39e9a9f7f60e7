"""NatsJobQueue against a real NATS JetStream server of the test's own (restarted by one test)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path

import pytest

from chat_service.jobs.queue import Delivery, JetStreamConfig, NatsJobQueue
from chatmesh.common.errors import ResourceExhausted, Unavailable
from tests.support.nats import NatsServer, run_nats
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with run_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


def config_for(server: NatsServer, **overrides: object) -> JetStreamConfig:
    """A stream of the test's own on the shared server."""
    name = f"T{uuid.uuid4().hex[:10]}"
    settings: dict[str, object] = {
        "url": server.url,
        "stream": name,
        "subject": f"test.{name}",
        "consumer": "workers",
        "fetch_wait_s": 0.2,
        **overrides,
    }
    return JetStreamConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def queue(nats_server: NatsServer) -> AsyncIterator[NatsJobQueue]:
    async with await NatsJobQueue.connect(config_for(nats_server, capacity=3, max_attempts=2)) as opened:
        yield opened


async def take(queue: NatsJobQueue, count: int) -> list[Delivery]:
    """The next `count` deliveries (left unsettled)."""
    taken: list[Delivery] = []
    async with aclosing(queue.deliveries()) as deliveries:
        async for delivery in deliveries:
            taken.append(delivery)
            if len(taken) == count:
                break
    return taken


async def _is_empty(queue: NatsJobQueue) -> bool:
    return await queued(queue) == 0


async def queued(queue: NatsJobQueue) -> int:
    """Messages the stream holds (queued or delivered but not yet settled)."""
    return await queue.depth()


async def test_a_job_submitted_twice_is_queued_once(queue: NatsJobQueue) -> None:
    await queue.submit("job-a")
    await queue.submit("job-a")
    await queue.submit("job-b")
    assert await queued(queue) == 2
    delivered = await take(queue, 2)
    assert [(d.job_id, d.attempt) for d in delivered] == [("job-a", 1), ("job-b", 1)]
    for delivery in delivered:
        await delivery.ack()
    assert await queued(queue) == 0


async def test_a_full_queue_refuses_at_once_and_keeps_what_it_has(queue: NatsJobQueue) -> None:
    for job in ("one", "two", "three"):
        await queue.submit(job)
    with pytest.raises(ResourceExhausted) as refused:
        await queue.submit("four")
    assert refused.value.retry_after_s > 0
    assert "full" in refused.value.message
    assert await queued(queue) == 3
    # Room again once a job is done.
    (first,) = await take(queue, 1)
    await first.ack()
    await queue.submit("four")
    assert await queued(queue) == 3


async def test_an_unacknowledged_job_comes_back_with_the_next_attempt_number(nats_server: NatsServer) -> None:
    config = config_for(nats_server, ack_wait_s=0.5, max_attempts=2)
    async with await NatsJobQueue.connect(config) as queue:
        await queue.submit("crashes")
        # A worker that takes the job and dies (settles nothing): the job is delivered again.
        (first,) = await take(queue, 1)
        (second,) = await take(queue, 1)
        assert (first.job_id, first.attempt, second.job_id, second.attempt) == ("crashes", 1, "crashes", 2)
        await second.ack()
        assert await queued(queue) == 0


async def test_retry_later_redelivers_and_give_up_removes(queue: NatsJobQueue) -> None:
    await queue.submit("flaky")
    (first,) = await take(queue, 1)
    await first.retry_later(0)
    (second,) = await take(queue, 1)
    assert (second.job_id, second.attempt) == ("flaky", 2)
    await second.give_up()
    await eventually(lambda: _is_empty(queue), "the given-up job left the stream")


async def test_queued_jobs_survive_a_restart_of_nats(tmp_path: Path) -> None:
    with run_nats(tmp_path / "store") as server:
        config = config_for(server)
        jobs = [f"job-{i}" for i in range(5)]
        async with await NatsJobQueue.connect(config) as queue:
            for job in jobs:
                await queue.submit(job)
        server.restart()
        async with await NatsJobQueue.connect(config) as queue:
            delivered = await take(queue, len(jobs))
            assert sorted(d.job_id for d in delivered) == jobs
            assert {d.attempt for d in delivered} == {1}
            for delivery in delivered:
                await delivery.ack()
            assert await queued(queue) == 0


async def test_no_broker_is_unavailable_with_the_fix_in_the_message(tmp_path: Path) -> None:
    with run_nats(tmp_path / "store") as server:
        url = server.url
    with pytest.raises(Unavailable) as refused:
        await NatsJobQueue.connect(JetStreamConfig(url=url))
    assert "JOBS_NATS_URL" in refused.value.message


async def test_a_submission_while_nats_is_down_fails_cleanly(tmp_path: Path) -> None:
    with run_nats(tmp_path / "store") as server:
        async with await NatsJobQueue.connect(config_for(server, publish_timeout_s=0.5)) as queue:
            server.stop()
            with pytest.raises(Unavailable):
                await queue.submit("lost?")
            server.start()
            # Back: the client reconnects by itself and the next submission is queued.
            await asyncio.wait_for(_submit_when_back(queue, "after"), timeout=20)
            (delivery,) = await take(queue, 1)
            assert delivery.job_id == "after"
            await delivery.ack()


async def _submit_when_back(queue: NatsJobQueue, job_id: str) -> None:
    while True:
        try:
            await queue.submit(job_id)
            return
        except Unavailable:
            await asyncio.sleep(0.1)
