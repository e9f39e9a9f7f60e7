"""PostgreSQL restarted under a chat service (a private server, stopped and started by the test): calls
fail cleanly with UNAVAILABLE while it is down and gRPC health says NOT_SERVING, calls succeed and health
says SERVING again once it is back, and nothing committed is lost or stored twice."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from tests.support.chat import ChatClient, drain
from tests.support.databases import PrivatePostgres, private_postgres
from tests.support.processes import free_port, run_service
from tests.support.services import NOT_SERVING, SERVING, chat_health
from tests.support.stack import chat_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


async def complete(client: ChatClient, chat_id: str, request_id: str) -> pb.CompletionEvent:
    """One short completion with a request id; its last event."""
    request = pb.CompleteRequest(
        chat_id=chat_id, content=f"Say {request_id}.", max_tokens=4, temperature=0, request_id=request_id
    )
    done = await drain(client.stub.Complete(request, metadata=client.metadata))
    assert done.last is not None
    return done.last


async def test_a_database_restart_fails_calls_cleanly_and_loses_nothing(
    postgres: PrivatePostgres, inference_address: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = chat_env(address, postgres.url, inference_address, health_check_interval_s=0.1)
    with run_service("chat_service", env, address, timeout=60):
        async with grpc.aio.insecure_channel(address) as channel:
            alice = ChatClient(channel)
            chat_id = (await alice.create()).chat_id
            replies = {
                rid: (await complete(alice, chat_id, rid)).assistant_message_id for rid in ("r0", "r1")
            }

            postgres.stop()
            for call in (complete(alice, chat_id, "r2"), alice.list()):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
                assert "database" in (failed.value.details() or "")

            async def health_is(status: int) -> bool:
                return await chat_health(address) == {status}

            # Load balancers route around it meanwhile.
            await eventually(lambda: health_is(NOT_SERVING), "NOT_SERVING while the database is down")

            postgres.start()
            await eventually(lambda: health_is(SERVING), "SERVING once the database is back", timeout_s=30)

            async def answered() -> bool:
                try:
                    replies["r2"] = (await complete(alice, chat_id, "r2")).assistant_message_id
                except grpc.aio.AioRpcError as error:
                    # Connections the server dropped are noticed on use: UNAVAILABLE, never anything else.
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                    return False
                return True

            await eventually(answered, "a completion after the database came back", timeout_s=30)
            replies["r3"] = (await complete(alice, chat_id, "r3")).assistant_message_id
            history = await alice.all_messages(chat_id)
    questions = [m.content for m in history if m.role == pb.ROLE_USER]
    assert questions == ["Say r0.", "Say r1.", "Say r2.", "Say r3."], "each question stored once"
    assert [m.message_id for m in history if m.role == pb.ROLE_ASSISTANT] == list(replies.values())
