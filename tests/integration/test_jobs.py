"""Asynchronous completions through real chat services, a real NATS JetStream server, SQLite and the real
model: submit, watch, read; privacy; a full queue; and workers killed mid-job (SIGKILL)."""

from __future__ import annotations

import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from tests.support.chat import ChatClient, auth, drain, grpc_errors
from tests.support.nats import NatsServer, run_nats
from tests.support.processes import free_port, run_service, start_process, stop_process, wait_until_serving
from tests.support.services import COUNTING_SYSTEM_PROMPT
from tests.support.stack import chat_env, jobs_chat_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

SHORT = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with run_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


def jobs_env(
    address: str, database: Path, inference: str, nats: NatsServer, stream: str, **settings: Any
) -> dict[str, str]:
    """A chat replica on the SQLite file `database` with jobs on `stream` of `nats`."""
    return jobs_chat_env(address, f"sqlite+aiosqlite:///{database}", inference, nats.url, stream, **settings)


@pytest.fixture(scope="module")
def chat_address(
    inference_address: str, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    env = jobs_env(
        address, tmp_path_factory.mktemp("jobs") / "chat.db", inference_address, nats_server, "JOBS_MAIN"
    )
    with run_service("chat_service", env, address, timeout=60) as process:
        yield address
    assert process.returncode == 0


@pytest.fixture
async def channel(chat_address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(chat_address) as opened:
        yield opened


class JobClient:
    """The job RPCs as one user."""

    def __init__(self, channel: grpc.aio.Channel, chat: ChatClient) -> None:
        self.chat = chat
        self.stub = chat_pb2_grpc.ChatServiceStub(channel)
        self.metadata = auth(chat.user)

    async def submit(self, chat_id: str, content: str, **fields: Any) -> pb.Job:
        """Through the SDK (which maps errors), re-raised as the gRPC error for the tests to inspect."""
        with grpc_errors():
            return await self.chat.sdk.submit_job(chat_id, content, **fields)

    async def get(self, job_id: str) -> pb.Job:
        with grpc_errors():
            return await self.chat.sdk.get_job(job_id)

    def watch(self, job_id: str) -> grpc.aio.UnaryStreamCall[pb.WatchJobRequest, pb.CompletionEvent]:
        return self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=self.metadata)

    async def finished(self, job_id: str, timeout_s: float = 60) -> pb.Job:
        """The job once it succeeded or failed."""
        done: list[pb.Job] = []

        async def is_done() -> bool:
            job = await self.get(job_id)
            if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED):
                done.append(job)
            return bool(done)

        await eventually(is_done, f"job {job_id} finished", timeout_s)
        return done[0]


def client(channel: grpc.aio.Channel) -> JobClient:
    return JobClient(channel, ChatClient(channel))


async def expect_status(code: grpc.StatusCode, call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await drain(call)
        else:
            await call
    assert failed.value.code() == code, failed.value.details()
    return failed.value


async def test_a_job_is_answered_once_and_can_be_watched_and_read(channel: grpc.aio.Channel) -> None:
    alice = client(channel)
    chat_id = (await alice.chat.create()).chat_id
    job = await alice.submit(chat_id, "What is the capital of France?", **SHORT)
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    assert job.chat_id == chat_id
    assert not job.HasField("reply")

    watched = await drain(alice.watch(job.job_id))
    assert watched.first.user_message_id == job.user_message_id
    assert watched.last is not None
    assert watched.last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert watched.text

    done = await alice.finished(job.job_id)
    assert (done.state, done.attempts, done.error) == (pb.JOB_STATE_SUCCEEDED, 1, "")
    assert done.reply.content == watched.text
    assert done.reply.message_id == watched.last.assistant_message_id
    history = await alice.chat.all_messages(chat_id)
    assert [(m.role, m.message_id) for m in history] == [
        (pb.ROLE_USER, job.user_message_id),
        (pb.ROLE_ASSISTANT, done.reply.message_id),
    ]
    # Watching a finished job replays its stored reply (here through the SDK).
    replayed = await alice.chat.sdk.watch_job(job.job_id).collect()
    assert (replayed.text, replayed.assistant_message_id) == (watched.text, done.reply.message_id)


async def test_a_retried_submission_is_the_same_job(channel: grpc.aio.Channel) -> None:
    alice = client(channel)
    chat_id = (await alice.chat.create()).chat_id
    request_id = f"req-{uuid.uuid4()}"
    first = await alice.submit(chat_id, "Name a colour.", request_id=request_id, **SHORT)
    again = await alice.submit(chat_id, "Name a colour.", request_id=request_id, **SHORT)
    assert again.job_id == first.job_id
    await alice.finished(first.job_id)
    history = await alice.chat.all_messages(chat_id)
    assert [m.role for m in history] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]


async def test_jobs_are_private(channel: grpc.aio.Channel) -> None:
    alice, bob = client(channel), client(channel)
    chat_id = (await alice.chat.create()).chat_id
    job = await alice.submit(chat_id, "What is two plus two?", **SHORT)
    await expect_status(grpc.StatusCode.NOT_FOUND, bob.get(job.job_id))
    await expect_status(grpc.StatusCode.NOT_FOUND, bob.watch(job.job_id))
    await expect_status(grpc.StatusCode.NOT_FOUND, bob.submit(chat_id, "Mine now?", **SHORT))
    await alice.finished(job.job_id)
    assert len(await alice.chat.all_messages(chat_id)) == 2


async def test_bad_job_requests_name_the_field(channel: grpc.aio.Channel) -> None:
    alice = client(channel)
    error = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, alice.get("not-a-job"))
    assert "job_id" in (error.details() or "")
    chat_id = (await alice.chat.create()).chat_id
    error = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, alice.submit(chat_id, ""))
    assert "content" in (error.details() or "")
    error = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, alice.submit(chat_id, "Hi", temperature=5.0)
    )
    assert "temperature" in (error.details() or "")
    await expect_status(grpc.StatusCode.NOT_FOUND, alice.get(str(uuid.uuid4())))
    assert await alice.chat.all_messages(chat_id) == []


async def test_a_full_queue_refuses_at_once_and_stores_nothing(
    inference_address: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    # No workers: what is queued stays queued.
    env = jobs_env(
        address,
        tmp_path / "chat.db",
        inference_address,
        nats_server,
        "JOBS_FULL",
        jobs_capacity=1,
        jobs_workers=0,
    )
    with run_service("chat_service", env, address, timeout=60):
        async with grpc.aio.insecure_channel(address) as channel:
            alice = client(channel)
            chat_id = (await alice.chat.create()).chat_id
            queued = await alice.submit(chat_id, "First.", **SHORT)
            assert queued.state == pb.JOB_STATE_QUEUED
            error = await expect_status(
                grpc.StatusCode.RESOURCE_EXHAUSTED, alice.submit(chat_id, "Second.", **SHORT)
            )
            assert "full" in (error.details() or "")
            assert any(key == "retry-after-ms" for key, _ in error.trailing_metadata() or ())
            history = await alice.chat.all_messages(chat_id)
            assert [m.content for m in history] == ["First."]


async def test_jobs_off_says_how_to_switch_them_on(inference_address: str, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = chat_env(address, f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", inference_address)
    with run_service("chat_service", env, address, timeout=60):
        async with grpc.aio.insecure_channel(address) as channel:
            alice = client(channel)
            chat_id = (await alice.chat.create()).chat_id
            error = await expect_status(
                grpc.StatusCode.FAILED_PRECONDITION, alice.submit(chat_id, "Later.", **SHORT)
            )
            assert "JOBS_NATS_URL" in (error.details() or "")
            assert await alice.chat.all_messages(chat_id) == []


async def _watch_until_deltas(watcher: JobClient, job_id: str, deltas: int) -> None:
    """Follow the job live on the replica running it until `deltas` pieces of the reply arrived."""
    call = watcher.watch(job_id)
    seen = 0
    async for event in call:
        seen += bool(event.delta)
        if seen >= deltas:
            break
    call.cancel()


@pytest.mark.parametrize("max_attempts", [3, 1])
async def test_a_worker_killed_mid_job(
    inference_address: str, nats_server: NatsServer, tmp_path: Path, max_attempts: int
) -> None:
    """SIGKILL the replica generating a job's reply. With attempts left, another worker takes the job
    over after the ack wait and it completes exactly once; with none left (a poison job), it is marked
    failed with the reason, and the question stays without a reply."""
    database = tmp_path / "chat.db"
    stream = f"JOBS_KILL_{max_attempts}"
    front, worker = (f"127.0.0.1:{free_port()}" for _ in range(2))
    common: dict[str, Any] = {"jobs_ack_wait_s": 2, "jobs_max_attempts": max_attempts}
    front_env = jobs_env(front, database, inference_address, nats_server, stream, jobs_workers=0, **common)
    worker_env = jobs_env(
        worker,
        database,
        inference_address,
        nats_server,
        stream,
        migrate=False,
        **common,
    )
    with run_service("chat_service", front_env, front, timeout=60):
        doomed = start_process([sys.executable, "-m", "chat_service"], worker_env)
        try:
            wait_until_serving(doomed, worker, 60)
            async with (
                grpc.aio.insecure_channel(front) as front_channel,
                grpc.aio.insecure_channel(worker) as worker_channel,
            ):
                alice = client(front_channel)
                chat = await alice.chat.create(system_prompt=COUNTING_SYSTEM_PROMPT)
                job = await alice.submit(chat.chat_id, "Count to 300.", max_tokens=400, temperature=0.0)
                watcher = JobClient(worker_channel, alice.chat)
                await _watch_until_deltas(watcher, job.job_id, 3)
                doomed.send_signal(signal.SIGKILL)
                doomed.wait()
        finally:
            stop_process(doomed)
            doomed.remove_log()
        # A new worker (a restarted replica) picks the job up once the dead one's ack wait is over.
        with run_service("chat_service", worker_env, worker, timeout=60):
            async with grpc.aio.insecure_channel(front) as front_channel:
                alice_again = JobClient(front_channel, ChatClient(front_channel, alice.chat.user))
                done = await alice_again.finished(job.job_id, timeout_s=120)
                history = await alice_again.chat.all_messages(chat.chat_id)
    if max_attempts > 1:
        assert (done.state, done.attempts) == (pb.JOB_STATE_SUCCEEDED, 2)
        assert [m.role for m in history] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
        assert history[1].message_id == done.reply.message_id
        assert done.reply.content.startswith("1, 2, 3")
    else:
        assert (done.state, done.attempts) == (pb.JOB_STATE_FAILED, 1)
        assert "stopped" in done.error
        assert [m.role for m in history] == [pb.ROLE_USER]


async def test_queued_jobs_survive_a_nats_restart_and_complete_once(
    inference_address: str, tmp_path: Path
) -> None:
    """Jobs queued while no worker runs, then NATS restarted: every job completes, each exactly once, and
    the replica that queued them queues more without a restart of its own."""
    database = tmp_path / "chat.db"
    front, worker = (f"127.0.0.1:{free_port()}" for _ in range(2))
    with run_nats(tmp_path / "nats") as nats:
        front_env = jobs_env(front, database, inference_address, nats, "JOBS_RESTART", jobs_workers=0)
        worker_env = jobs_env(worker, database, inference_address, nats, "JOBS_RESTART", migrate=False)
        with run_service("chat_service", front_env, front, timeout=60):
            async with grpc.aio.insecure_channel(front) as channel:
                alice = client(channel)
                chats = [(await alice.chat.create()).chat_id for _ in range(4)]
                jobs = [await alice.submit(chat_id, f"Say {i}.", **SHORT) for i, chat_id in enumerate(chats)]
                assert {job.state for job in jobs} == {pb.JOB_STATE_QUEUED}
                nats.restart()
                # The replica reconnects by itself; a submission succeeds once it has.
                late_chat = (await alice.chat.create()).chat_id
                late = await _submit_when_reconnected(alice, late_chat)
                with run_service("chat_service", worker_env, worker, timeout=60):
                    finished = [await alice.finished(job.job_id) for job in [*jobs, late]]
                for chat_id, job in zip([*chats, late_chat], finished, strict=True):
                    assert (job.state, job.attempts) == (pb.JOB_STATE_SUCCEEDED, 1)
                    history = await alice.chat.all_messages(chat_id)
                    assert [m.role for m in history] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
                    assert history[1].message_id == job.reply.message_id


async def _submit_when_reconnected(alice: JobClient, chat_id: str) -> pb.Job:
    """Submit a job, retrying while the replica's NATS connection is still coming back (UNAVAILABLE)."""
    submitted: list[pb.Job] = []

    async def try_submit() -> bool:
        try:
            submitted.append(await alice.submit(chat_id, "Say late.", request_id="late", **SHORT))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            return False
        return True

    await eventually(try_submit, "a submission after NATS restarted", timeout_s=30)
    return submitted[-1]
