"""Asynchronous completions: submit now, answered by a worker later, read or watched meanwhile.

`Jobs` holds the use cases the servicer calls (submit, get, watch) and `JobWorker` the loop that runs
queued jobs. A job is a row (`JobStore`) answering one stored user message; the queue carries its id.
Exactly once in the history rests on the store: a message has one reply at most, and a redelivered job
first looks for it. The worker runs a job through `Conversations`, so a job's completion is the same as a
synchronous one (history strategy, cache, engine) and a retry or a watcher in this process joins it.
`JobSweeper` queues the jobs a replica stored but stopped before queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from chat_service.conversations import (
    CompletionEvent,
    Conversations,
    Failed,
    Started,
    stored_reply_events,
)
from chat_service.conversations.leases import CompletionLeases
from chat_service.domain import Job, JobRequest, JobState, Message
from chat_service.inference import SamplingOptions
from chat_service.jobs.queue import Delivery, JobQueue
from chat_service.limits import too_many_jobs
from chat_service.storage.base import JobStore, LimitReached
from chatmesh.common.errors import ChatmeshError, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as its owner sees it: the row and, once stored, the reply."""

    job: Job
    reply: Message | None


class Jobs:
    """The job use cases for authenticated users; every method takes the caller's user id first."""

    def __init__(
        self,
        store: JobStore,
        queue: JobQueue,
        conversations: Conversations,
        poll_interval_s: float = 0.25,
        *,
        max_active_per_user: int = 0,
    ) -> None:
        self._store = store
        self._max_active_per_user = max_active_per_user
        self._queue = queue
        self._conversations = conversations
        self._poll_interval_s = poll_interval_s

    async def submit(
        self,
        user_id: str,
        chat_id: uuid.UUID,
        content: str,
        sampling: SamplingOptions,
        request_id: str | None,
        use_cache: bool,
    ) -> JobView:
        """Store the question and queue its job. A full queue (ResourceExhausted) or an unreachable one
        (Unavailable) stores nothing: the question and the job are taken back before the error is raised.
        So does a user at their limit of unfinished jobs (ResourceExhausted naming it). A retry (same
        `request_id`) returns the first submission's job. A user over a token budget is refused
        (ResourceExhausted naming it) before anything is stored."""
        await self._conversations.admit(user_id)
        message, stored = await self._conversations.store_question(user_id, chat_id, content, request_id)
        request = JobRequest(
            user_id=user_id,
            chat_id=chat_id,
            user_message_id=message.id,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            use_cache=use_cache,
        )
        try:
            job, _ = await self._store.create_job(request, self._max_active_per_user)
        except LimitReached as reached:
            if stored:
                await self._store.discard_question(user_id, message.id)
            raise too_many_jobs(
                user_id, reached, self._max_active_per_user, self._conversations.completion_durations
            ) from None
        if job.state == JobState.QUEUED and job.attempts == 0:
            # Also on a retry: the first attempt may have stopped before queueing it (the queue drops
            # a second copy of an id it holds).
            try:
                await self._queue.submit(str(job.id))
            except ChatmeshError:
                await self._store.discard_job(job)
                raise
            try:
                await self._store.mark_job_published(job.id)
            except Exception as exc:  # the job is queued; at worst the sweeper publishes it once more
                log.warning(
                    "recording that a job was queued failed",
                    extra={"job_id": str(job.id), "error": repr(exc)},
                )
        return await self.get(user_id, job.id)

    async def get(self, user_id: str, job_id: uuid.UUID) -> JobView:
        """The user's job and its reply if stored; `NotFound` for another user's."""
        job = await self._store.get_job(user_id, job_id)
        reply = await self._conversations.find_reply(user_id, job.request.user_message_id)
        return JobView(job, reply)

    async def watch(self, user_id: str, job_id: uuid.UUID) -> AsyncGenerator[CompletionEvent, None]:
        """The job's reply as completion events: live from the first event while it runs in this process,
        else the stored reply once there is one (waiting for it). A failed job ends with `Failed`, then
        its error raised."""
        while True:
            view = await self.get(user_id, job_id)
            request = view.job.request
            if view.reply is not None:
                for event in stored_reply_events(request.chat_id, request.user_message_id, view.reply):
                    yield event
                return
            if view.job.state == JobState.FAILED:
                error = Unavailable(f"the job failed: {view.job.error}")
                yield Started(request.chat_id, request.user_message_id)
                yield Failed(error)
                raise error
            # Jobs are the user's own (get() checked): the message is theirs.
            live = self._conversations.follow_stored(request.user_message_id)
            if live is not None:
                async with aclosing(live) as events:
                    async for event in events:
                        yield event
                return
            # Queued, or running on another replica: its reply lands in the database.
            await asyncio.sleep(self._poll_interval_s)


class JobWorker:
    """Runs queued jobs, `concurrency` at a time, until `stop`.

    Per delivery: a job that is gone (its chat was deleted) or finished is acknowledged; one delivered
    more than `queue.max_attempts` times (its workers died on every attempt) is marked failed; otherwise
    it is marked running and answered. A failure that another attempt may not meet (engine busy or
    down, database down) is retried after a backoff, up to the attempts allowed; any other is final.
    While it runs, the worker tells the queue it is alive, so a long generation is not redelivered.

    A job can still be delivered again while its first worker generates (that worker is slow, or its
    heartbeats were lost): before answering, a worker takes the completion lease that synchronous
    retries use (`leases`, the replica's own, so the generation it starts renews it), and while another
    replica holds it, waits for that replica's reply (or for its lease to lapse) instead of generating
    a second one.
    """

    def __init__(
        self,
        store: JobStore,
        queue: JobQueue,
        conversations: Conversations,
        *,
        leases: CompletionLeases,
        concurrency: int = 1,
        heartbeat_s: float = 5.0,
        retry_delay_s: float = 1.0,
        poll_interval_s: float = 0.25,
        sweeper: JobSweeper | None = None,
    ) -> None:
        self._store = store
        self._leases = leases
        self._poll_interval_s = poll_interval_s
        self._sweeper = sweeper
        self._sweeping: asyncio.Task[None] | None = None
        self._queue = queue
        self._conversations = conversations
        self._concurrency = concurrency
        self._heartbeat_s = heartbeat_s
        self._retry_delay_s = retry_delay_s
        self._consumers: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Start taking jobs (and sweeping for jobs never queued, with a sweeper)."""
        self._consumers = [
            asyncio.create_task(self._consume(), name=f"job-consumer-{i}") for i in range(self._concurrency)
        ]
        if self._sweeper is not None:
            self._sweeping = asyncio.create_task(self._sweeper.run(), name="job-sweeper")

    async def stop(self, grace_s: float) -> None:
        """Take no more jobs, give the running ones `grace_s` to finish, then cancel them (their jobs are
        delivered again to another worker)."""
        self._stopping.set()
        if self._sweeping is not None:
            self._sweeping.cancel()
        if self._running:
            await asyncio.wait(self._running, timeout=grace_s)
        for task in [*self._consumers, *self._running]:
            task.cancel()
        for task in [*self._consumers, *self._running]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _consume(self) -> None:
        async with aclosing(self._queue.deliveries()) as deliveries:
            async for delivery in deliveries:
                if self._stopping.is_set():
                    # Back to the queue at once for another worker.
                    with contextlib.suppress(Exception):
                        await delivery.retry_later(0)
                    return
                handling = asyncio.create_task(self._handle(delivery))
                self._running.add(handling)
                handling.add_done_callback(self._running.discard)
                # One job at a time per consumer; shielded so that stop() can let it finish.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(handling)
                if self._stopping.is_set():
                    return

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self._run(delivery)
        except asyncio.CancelledError:
            raise  # shutting down: the job is delivered again after the ack wait
        except Exception:
            # The database or the broker failed under us: leave the delivery unsettled, so the job comes
            # back after the ack wait, when they may be back.
            log.exception(
                "a job could not be handled; it will be delivered again", extra={"job_id": delivery.job_id}
            )

    async def _run(self, delivery: Delivery) -> None:
        try:
            job_id = uuid.UUID(delivery.job_id)
        except ValueError:
            log.error("a queued job id is not a UUID; dropped", extra={"job_id": delivery.job_id})
            await delivery.give_up()
            return
        job = await self._store.load_job(job_id)
        if job is None or job.state.finished:
            await delivery.ack()
            return
        attempts_allowed = self._queue.max_attempts
        if delivery.attempt > attempts_allowed:
            reason = job.error or "its worker stopped during every attempt"
            await self._store.update_job(job.id, JobState.FAILED, delivery.attempt - 1, reason)
            log.warning("job failed for good", extra={"job_id": str(job.id), "error": reason})
            await delivery.give_up()
            return
        await self._store.update_job(job.id, JobState.RUNNING, delivery.attempt, job.error)
        request = job.request
        sampling = SamplingOptions(request.max_tokens, request.temperature, request.top_p, request.seed)
        beating = asyncio.create_task(self._heartbeat(delivery))
        try:
            await self._take_completion(request.user_id, request.user_message_id)
            await self._conversations.answer_stored(
                request.user_id, request.user_message_id, sampling, request.use_cache
            )
        except NotFound:
            await delivery.ack()  # the chat was deleted, and the job with it
            return
        except (Unavailable, ResourceExhausted) as exc:
            await self._let_go(request.user_message_id)
            await self._retry_or_fail(job, delivery, exc.message)
            return
        except ChatmeshError as exc:
            await self._let_go(request.user_message_id)
            await self._fail(job, delivery, exc.message)
            return
        finally:
            beating.cancel()
        await self._store.update_job(job.id, JobState.SUCCEEDED, delivery.attempt)
        await delivery.ack()
        log.info("job done", extra={"job_id": str(job.id), "attempt": delivery.attempt})

    async def _take_completion(self, user_id: str, message_id: uuid.UUID) -> None:
        """Return once this replica holds the lease on generating the reply, or the reply is stored;
        while another replica holds the lease (it is generating), wait."""
        await self._leases.reply_or_take(
            user_id,
            message_id,
            poll_interval_s=self._poll_interval_s,
            waiting="another replica is generating this job's reply; waiting for it",
        )

    async def _let_go(self, message_id: uuid.UUID) -> None:
        """Free the lease after a failed attempt, so the next may start at once on any replica."""
        await self._leases.release(message_id)

    async def _retry_or_fail(self, job: Job, delivery: Delivery, reason: str) -> None:
        if delivery.attempt >= self._queue.max_attempts:
            await self._fail(job, delivery, reason)
            return
        delay = self._retry_delay_s * 2 ** (delivery.attempt - 1)
        await self._store.update_job(job.id, JobState.QUEUED, delivery.attempt, reason)
        log.warning(
            "job attempt failed; retrying",
            extra={"job_id": str(job.id), "attempt": delivery.attempt, "error": reason, "delay_s": delay},
        )
        await delivery.retry_later(delay)

    async def _fail(self, job: Job, delivery: Delivery, reason: str) -> None:
        await self._store.update_job(job.id, JobState.FAILED, delivery.attempt, reason)
        log.warning("job failed", extra={"job_id": str(job.id), "attempt": delivery.attempt, "error": reason})
        await delivery.give_up()

    async def _heartbeat(self, delivery: Delivery) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            with contextlib.suppress(Exception):
                await delivery.still_working()


class JobSweeper:
    """Queues the jobs that were stored but never queued.

    A submission stores its job, then publishes the job's id; a replica that stops in between (a crash,
    a deploy) leaves a job QUEUED that no worker will ever see. Every `interval_s`, the jobs older than
    `grace_s` that the queue never took are published. Every replica that runs jobs sweeps (its
    `JobWorker` runs the sweeper): the queue drops a second copy of an id, so replicas racing for one
    job queue it once. `grace_s` is well beyond
    how long a submission takes to publish, so a sweep does not publish for a submission still under way.
    """

    def __init__(
        self, store: JobStore, queue: JobQueue, *, interval_s: float, grace_s: float, batch: int = 100
    ) -> None:
        self._store = store
        self._queue = queue
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._batch = batch

    async def sweep(self) -> int:
        """Publish the jobs left unqueued (up to a batch); returns how many were."""
        created_before = datetime.now(UTC) - timedelta(seconds=self._grace_s)
        published = 0
        for job in await self._store.unpublished_jobs(created_before, self._batch):
            try:
                await self._queue.submit(str(job.id))
            except ResourceExhausted:
                log.warning("the job queue is full; jobs never queued wait for the next sweep")
                break
            await self._store.mark_job_published(job.id)
            published += 1
            log.warning(
                "a job its replica never queued is queued now",
                extra={"job_id": str(job.id), "created_at": job.created_at.isoformat()},
            )
        return published

    async def run(self) -> None:
        """Sweep every `interval_s` until cancelled; a sweep that fails (database or queue down) is
        logged, and the next one tries again."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep()
            except ChatmeshError as exc:
                log.warning("sweeping for jobs never queued failed", extra={"error": exc.message})
            except Exception:
                log.exception("sweeping for jobs never queued failed")
