"""Jobs recovered from what the happy path never sees, through real chat services, a real NATS JetStream
server, real PostgreSQL and the real model (behind a recording proxy that counts the generations): a job
its replica stored but never queued, a job delivered again while its first worker still generates, and
credentials in the NATS URL kept out of the logs."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from chat_service.domain import HistoryStrategy, JobRequest
from chat_service.jobs.queue import JetStreamConfig, NatsJobQueue
from chat_service.storage.base import NOT_COUNTED
from chat_service.storage.sql import SqlJobStore, open_sql_store
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.client import Delta
from chatmesh.common.errors import Unavailable
from tests.support.chat import ChatClient, grpc_errors
from tests.support.databases import fresh_postgres_database
from tests.support.nats import NatsServer, run_nats
from tests.support.processes import free_port, run_service
from tests.support.recording_proxy import run_recording_proxy
from tests.support.services import COUNTING_SYSTEM_PROMPT
from tests.support.stack import jobs_chat_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

SECRET = "hunter2-in-the-url"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with run_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


async def job_when(chat: ChatClient, job_id: str, done: bool) -> pb.Job:
    """The job once it finished (`done`), else once a second delivery reached a worker."""
    seen: list[pb.Job] = []

    async def reached() -> bool:
        with grpc_errors():
            job = await chat.sdk.get_job(job_id)
        finished = job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED)
        if finished if done else job.attempts >= 2:
            seen.append(job)
        return bool(seen)

    await eventually(reached, f"job {job_id} {'finished' if done else 'delivered again'}", timeout_s=240)
    return seen[0]


async def test_a_job_its_replica_never_queued_is_queued_by_a_sweep_and_answered_once(
    inference_address: str, nats_server: NatsServer
) -> None:
    """A replica that stops between storing a job and publishing it leaves a QUEUED job that no message
    in the queue stands for; a sweep (of any replica) queues it, and it is answered once."""
    address = f"127.0.0.1:{free_port()}"
    user = f"user-{uuid.uuid4().hex[:8]}"
    async with fresh_postgres_database() as url:
        with run_recording_proxy(inference_address) as (engine, recorder):
            env = jobs_chat_env(
                address,
                url,
                engine,
                nats_server.url,
                "JOBS_SWEEP",
                jobs_sweep_interval_s=0.2,
                jobs_requeue_after_s=0.5,
            )
            with run_service("chat_service", env, address, timeout=60):
                # What the stopped replica left: the question and its job, stored; nothing published.
                async with open_sql_store(url, migrate=False) as store:
                    chat, _ = await store.create_chat(user, "", "", HistoryStrategy.FULL)
                    question, _ = await store.add_user_message(
                        user, chat.id, "What is the capital of France?", NOT_COUNTED, None
                    )
                    job, _ = await SqlJobStore(store.database).create_job(
                        JobRequest(user, chat.id, question.id, 8, 0.0, None, None, use_cache=False)
                    )
                async with grpc.aio.insecure_channel(address) as channel:
                    alice = ChatClient(channel, user)
                    done = await job_when(alice, str(job.id), done=True)
                    history = await alice.all_messages(str(chat.id))
    assert (done.state, done.attempts) == (pb.JOB_STATE_SUCCEEDED, 1)
    assert [m.role for m in history] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert history[1].message_id == done.reply.message_id
    assert len(recorder.chat_requests()) == 1


async def test_a_job_delivered_again_while_its_first_worker_generates_is_generated_once(
    inference_address: str, nats_server: NatsServer
) -> None:
    """A worker that is slow rather than dead (here: stopped with SIGSTOP, so its heartbeats stop) has its
    job delivered again to another replica after the ack wait. That replica finds the first one's
    completion lease and waits for its reply instead of generating a second one."""
    first, second = (f"127.0.0.1:{free_port()}" for _ in range(2))
    # A lease far longer than the test: it must not lapse while the first replica is stopped.
    common: dict[str, Any] = {"jobs_ack_wait_s": 2, "completion_lease_s": 300}
    async with fresh_postgres_database() as url:
        with run_recording_proxy(inference_address) as (engine, recorder):
            first_env = jobs_chat_env(first, url, engine, nats_server.url, "JOBS_AGAIN", **common)
            second_env = jobs_chat_env(
                second,
                url,
                engine,
                nats_server.url,
                "JOBS_AGAIN",
                migrate=False,
                **common,
            )
            with run_service("chat_service", first_env, first, timeout=60) as slow:
                async with grpc.aio.insecure_channel(first) as channel:
                    alice = ChatClient(channel)
                    chat = await alice.create(system_prompt=COUNTING_SYSTEM_PROMPT)
                    with grpc_errors():
                        job = await alice.sdk.submit_job(
                            chat.chat_id, "Count to 300.", max_tokens=100, temperature=0.0
                        )
                    # Generating on the first replica (the only one) once its events flow.
                    async with alice.sdk.watch_job(job.job_id) as events:
                        deltas = 0
                        async for event in events:
                            deltas += isinstance(event, Delta)
                            if deltas >= 3:
                                break
                slow.send_signal(signal.SIGSTOP)
                try:
                    with run_service("chat_service", second_env, second, timeout=60):
                        async with grpc.aio.insecure_channel(second) as channel:
                            again = ChatClient(channel, alice.user)
                            await job_when(again, job.job_id, done=False)
                            slow.send_signal(signal.SIGCONT)
                            done = await job_when(again, job.job_id, done=True)
                            history = await again.all_messages(chat.chat_id)
                finally:
                    slow.send_signal(signal.SIGCONT)
    assert done.state == pb.JOB_STATE_SUCCEEDED
    assert [m.role for m in history] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert history[1].message_id == done.reply.message_id
    assert done.reply.content.startswith("1, 2, 3")
    assert len(recorder.chat_requests()) == 1, "the reply was generated twice"


async def test_the_nats_url_is_logged_without_its_credentials(
    inference_address: str, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    address = f"127.0.0.1:{free_port()}"
    # The test server asks for no credentials, so it accepts these; the replica must not log them.
    nats_url = f"nats://chatmesh:{SECRET}@127.0.0.1:{nats_server.port}"
    database = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('creds') / 'chat.db'}"
    env = jobs_chat_env(address, database, inference_address, nats_url, "JOBS_CREDS")
    with run_service("chat_service", env, address, timeout=60) as replica:
        output = replica.output()
    assert f"nats://***@127.0.0.1:{nats_server.port}" in output
    assert SECRET not in output

    unreachable = f"nats://chatmesh:{SECRET}@127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable) as refused:
        await NatsJobQueue.connect(JetStreamConfig(url=unreachable, connect_deadline_s=0.5))
    assert SECRET not in str(refused.value)
    assert "nats://***@127.0.0.1" in str(refused.value)
