"""The job queue: asynchronous completions handed from the replica that accepts them to any worker.

`JobQueue` is what the chat service needs from a broker; `NatsJobQueue` is its implementation on NATS
JetStream, chosen in the composition root. A queued message carries only a job id: the job itself (whose
it is, which message it answers, its state) lives in the database, so the queue can lose nothing that is
not also written down, and a redelivered message finds the job as the last attempt left it.

Delivery is at least once: a worker that dies before acknowledging leaves its message to be redelivered
after `ack_wait_s`; a worker that is still busy says so (`Delivery.still_working`) so a long completion is
not taken for a dead one. Exactly once *in the history* is the worker's part (a completion is keyed by
its user message, which stores one reply at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol, Self

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from chatmesh.common.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

_STREAM_FULL = 10077
"""JetStream's error code for a publish refused by a stream at its `max_msgs` with `discard: new`."""


class Delivery(Protocol):
    """One delivery of a queued job to a worker. Exactly one of ack / retry_later / give_up ends it;
    a worker that ends none (it died) gets the job delivered again after the queue's ack wait."""

    job_id: str
    attempt: int
    """1 for the first delivery, 2 for the first redelivery, and so on."""

    async def ack(self) -> None:
        """The job is done (or was found done): never deliver it again."""
        ...

    async def retry_later(self, delay_s: float) -> None:
        """This attempt failed in a way another may not: deliver it again after `delay_s`."""
        ...

    async def give_up(self) -> None:
        """Never deliver it again, although it did not succeed (a poison job, marked failed)."""
        ...

    async def still_working(self) -> None:
        """Restart the ack wait: the worker is alive and the job still running."""
        ...


class JobQueue(Protocol):
    """A bounded queue of job ids with at-least-once delivery to competing workers."""

    max_attempts: int
    """Deliveries a job gets before the worker gives up on it."""

    async def submit(self, job_id: str) -> None:
        """Queue `job_id`. Submitting an id that is still queued (a client's retry) queues nothing new.
        Raises ResourceExhausted when the queue is full, Unavailable when the broker cannot be reached."""
        ...

    async def depth(self) -> int:
        """Jobs queued or delivered and not yet settled (Unavailable when the broker cannot be reached)."""
        ...

    def deliveries(self) -> AsyncGenerator[Delivery, None]:
        """Jobs for this worker, one at a time, as long as the caller iterates."""
        ...


@dataclass(frozen=True, slots=True)
class JetStreamConfig:
    """Where and how the jobs live on NATS JetStream."""

    url: str = "nats://127.0.0.1:4222"
    stream: str = "CHATMESH_JOBS"
    subject: str = "chatmesh.jobs"
    consumer: str = "chatmesh-workers"
    capacity: int = 1000
    """Jobs queued or running at most; a submission beyond it is refused at once."""
    max_attempts: int = 3
    ack_wait_s: float = 30.0
    """How long a delivery may go unacknowledged (and without `still_working`) before redelivery."""
    publish_timeout_s: float = 2.0
    fetch_wait_s: float = 1.0
    """How long one pull waits for a job before polling again (bounds how fast iteration notices a
    closed queue)."""
    duplicate_window_s: float = 600.0
    """Submissions of the same id within this window are one job (JetStream's Nats-Msg-Id dedup)."""
    connect_deadline_s: float = 5.0
    """How long start-up keeps trying to reach NATS before giving up with an error."""
    retry_after_s: float = 1.0
    """Suggested to a client whose submission found the queue full."""


def redacted_url(url: str) -> str:
    """`url` (one NATS URL, or several comma-separated) fit for a log or an error message: the
    credentials any of them carries are replaced by `***` (`nats://user:pass@host` and
    `nats://token@host` both become `nats://***@host`), the rest kept so the server can be told apart."""
    return ",".join(_redacted_server(server) for server in url.split(","))


def _redacted_server(server: str) -> str:
    scheme, separator, rest = server.partition("://")
    if not separator:
        scheme, rest = "", server
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return server
    host = authority.rpartition("@")[2]
    return f"{scheme}{separator}***@{host}{slash}{path}"


async def _log_connection_error(exc: Exception) -> None:
    log.warning("NATS connection error", extra={"error": repr(exc)})


async def _log_disconnected() -> None:
    log.warning("disconnected from NATS; reconnecting")


async def _log_reconnected() -> None:
    log.info("reconnected to NATS")


@dataclass(slots=True)
class _NatsDelivery:
    msg: Msg
    job_id: str
    attempt: int

    async def ack(self) -> None:
        # Waits for the server's confirmation: a worker that reports a job done must know the queue
        # heard it (a lost ack only means one more, harmless, delivery of a finished job).
        await self.msg.ack_sync(timeout=5)

    async def retry_later(self, delay_s: float) -> None:
        await self.msg.nak(delay=delay_s)

    async def give_up(self) -> None:
        await self.msg.term()

    async def still_working(self) -> None:
        await self.msg.in_progress()


class NatsJobQueue:
    """`JobQueue` on a JetStream work-queue stream with one durable pull consumer shared by every worker
    (each job goes to one of them). Open with `NatsJobQueue.connect`, close with `close` (or use as an
    async context manager).

    The stream is created (or its limits updated) on connect. `max_msgs` with `discard: new` bounds it:
    a full stream refuses the publish, which becomes ResourceExhausted. The consumer redelivers up to
    `max_attempts + 1` times: the extra delivery lets a worker mark a job that crashed its workers on
    every attempt as failed instead of leaving it in the stream forever.
    """

    def __init__(self, client: NatsClient, js: JetStreamContext, config: JetStreamConfig) -> None:
        self._client = client
        self._js = js
        self._config = config
        self.max_attempts = config.max_attempts

    @classmethod
    async def connect(cls, config: JetStreamConfig) -> Self:
        """Connect, and create or update the stream and the consumer."""
        try:
            # The client retries forever (a NATS restart must not need a chat service restart), the
            # first connection included; the deadline turns "no NATS at all" into an error.
            async with asyncio.timeout(config.connect_deadline_s):
                client = await nats.connect(
                    config.url,
                    connect_timeout=1,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    allow_reconnect=True,
                    name="chatmesh-chat",
                    error_cb=_log_connection_error,
                    disconnected_cb=_log_disconnected,
                    reconnected_cb=_log_reconnected,
                )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(
                f"cannot reach NATS at {redacted_url(config.url)} ({exc}); start nats-server with JetStream"
                " (-js) or set CHATMESH_CHAT_JOBS_NATS_URL"
            ) from exc
        js = client.jetstream()
        stream = StreamConfig(
            name=config.stream,
            subjects=[config.subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_msgs=config.capacity,
            discard=DiscardPolicy.NEW,
            duplicate_window=config.duplicate_window_s,
        )
        try:
            try:
                await js.add_stream(stream)
            except nats.js.errors.BadRequestError:
                # It exists with other limits (a changed capacity): take the new ones.
                await js.update_stream(stream)
            await js.add_consumer(
                config.stream,
                ConsumerConfig(
                    durable_name=config.consumer,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=config.ack_wait_s,
                    max_deliver=config.max_attempts + 1,
                    max_ack_pending=-1,
                ),
            )
        except BaseException:
            await client.close()
            raise
        return cls(client, js, config)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Flush and disconnect (unacknowledged deliveries go back to the stream after their ack wait)."""
        with contextlib.suppress(nats.errors.Error):
            await self._client.drain()

    async def submit(self, job_id: str) -> None:
        try:
            await self._js.publish(
                self._config.subject,
                job_id.encode(),
                timeout=self._config.publish_timeout_s,
                headers={"Nats-Msg-Id": job_id},
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STREAM_FULL:
                raise ResourceExhausted(
                    f"the job queue is full ({self._config.capacity} jobs); retry later",
                    self._config.retry_after_s,
                ) from exc
            raise Unavailable(f"NATS refused the job: {exc.description}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise Unavailable(f"the job queue (NATS) cannot be reached: {exc!r}") from exc

    async def depth(self) -> int:
        """Jobs in the stream: queued, or delivered and not yet settled."""
        try:
            info = await self._js.stream_info(self._config.stream)
        except (nats.errors.Error, OSError) as exc:
            raise Unavailable(f"the job queue (NATS) cannot be reached: {exc!r}") from exc
        return int(info.state.messages)

    async def deliveries(self) -> AsyncGenerator[Delivery, None]:
        subscription = await self._js.pull_subscribe_bind(self._config.consumer, stream=self._config.stream)
        try:
            while True:
                try:
                    messages = await subscription.fetch(1, timeout=self._config.fetch_wait_s)
                except nats.errors.TimeoutError:
                    continue
                except nats.errors.Error as exc:
                    # The connection is down and reconnecting: the pull is retried, nothing is lost.
                    log.warning("fetching a job failed; retrying", extra={"error": repr(exc)})
                    continue
                for msg in messages:
                    yield _NatsDelivery(msg, msg.data.decode(), msg.metadata.num_delivered)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
