"""A retried completion (same request id) that lands on another chat replica while the first attempt runs:
it joins that attempt through the store's completion lease instead of generating a second reply, so the
streamed text equals the stored reply; and when the first replica dies mid-stream, the retry takes over
once the lease lapses. Two real replicas on one SQLite file, the real model. Each completion is counted
once, in the metrics of the replica that generated it."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import grpc
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from tests.support.chat import ChatClient, drain
from tests.support.metrics import scrape, total
from tests.support.processes import free_port, run_service, start_process, stop_process, wait_until_serving
from tests.support.recording_proxy import run_recording_proxy
from tests.support.services import COUNTING_SYSTEM_PROMPT
from tests.support.stack import chat_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

LEASE_S = 2.0
"""Short, so that the take-over after a replica's death happens within the test's patience."""


def replica_env(
    address: str, database: Path, inference: str, name: str, migrate: bool, metrics: str
) -> dict[str, str]:
    return chat_env(
        address,
        f"sqlite+aiosqlite:///{database}",
        inference,
        migrate=migrate,
        replica_id=name,
        completion_lease_s=LEASE_S,
        metrics_address=metrics,
    )


def completions(metrics: str) -> float:
    """Completions the replica serving `metrics` has counted, whatever their outcome."""
    return total(scrape(metrics), "chatmesh_chat_completions_total")


def counting_request(chat_id: str, request_id: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        chat_id=chat_id, content="Count to 300.", max_tokens=120, temperature=0, request_id=request_id
    )


async def test_a_retry_on_another_replica_joins_the_running_completion(
    inference_address: str, tmp_path: Path
) -> None:
    database = tmp_path / "chat.db"
    first, second, first_metrics, second_metrics = (f"127.0.0.1:{free_port()}" for _ in range(4))
    with (
        run_recording_proxy(inference_address) as (engine, recorder),
        run_service(
            "chat_service", replica_env(first, database, engine, "a", True, first_metrics), first, 60
        ),
        run_service(
            "chat_service", replica_env(second, database, engine, "b", False, second_metrics), second, 60
        ),
    ):
        async with grpc.aio.insecure_channel(first) as one, grpc.aio.insecure_channel(second) as two:
            on_a = ChatClient(one)
            on_b = ChatClient(two, on_a.user)
            chat_id = (await on_a.create(system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
            request = counting_request(chat_id, "join-me")
            original = aiter(on_a.stub.Complete(request, metadata=on_a.metadata))
            started = [await anext(original)]
            while not started[-1].delta:
                started.append(await anext(original))
            # Replica a is mid-stream: the retry on replica b must not generate a reply of its own.
            retried = await drain(on_b.stub.Complete(request, metadata=on_b.metadata))
            rest = [event async for event in original]
            original_text = "".join(e.delta for e in [*started, *rest])
            history = await on_a.all_messages(chat_id)
        # Counted where it was generated; the retry that joined it is not a second completion.
        await eventually(lambda: completions(first_metrics) == 1, "replica a counts the completion")
        assert completions(second_metrics) == 0
    assert [m.role for m in history] == [pb.ROLE_USER, pb.ROLE_ASSISTANT], "one question, one reply"
    assert len(recorder.chat_requests()) == 1, "the retry joined: the engine generated the reply once"
    assert retried.first.user_message_id == started[0].user_message_id
    assert retried.text == original_text == history[1].content
    assert retried.last is not None and retried.last.assistant_message_id == history[1].message_id


async def test_a_retry_takes_over_from_a_replica_that_died_mid_stream(
    inference_address: str, tmp_path: Path
) -> None:
    database = tmp_path / "chat.db"
    first, second, first_metrics, second_metrics = (f"127.0.0.1:{free_port()}" for _ in range(4))
    survivor_env = replica_env(second, database, inference_address, "b", True, second_metrics)
    with run_service("chat_service", survivor_env, second, 60):
        doomed = start_process(
            [sys.executable, "-m", "chat_service"],
            replica_env(first, database, inference_address, "a", False, first_metrics),
        )
        try:
            wait_until_serving(doomed, first, 60)
            async with grpc.aio.insecure_channel(first) as one, grpc.aio.insecure_channel(second) as two:
                on_a = ChatClient(one)
                on_b = ChatClient(two, on_a.user)
                chat_id = (await on_b.create(system_prompt=COUNTING_SYSTEM_PROMPT)).chat_id
                request = counting_request(chat_id, "survive-me")
                original = aiter(on_a.stub.Complete(request, metadata=on_a.metadata))
                while not (await anext(original)).delta:
                    pass
                doomed.send_signal(signal.SIGKILL)
                doomed.wait()
                # The lease of the dead replica lapses; the retry then generates the reply itself.
                retried = await drain(on_b.stub.Complete(request, metadata=on_b.metadata))
                history = await on_b.all_messages(chat_id)
                # The take-over generated the reply: a completion of replica b's like any other.
                await eventually(lambda: completions(second_metrics) == 1, "replica b counts the completion")
        finally:
            stop_process(doomed)
            doomed.remove_log()
    assert [m.role for m in history] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert retried.text == history[1].content
    assert retried.text.startswith("1, 2, 3")
