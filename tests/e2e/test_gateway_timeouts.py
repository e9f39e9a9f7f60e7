"""The gateway's configured call limits apply: a real Envoy in front of a chat replica that stops
answering (SIGSTOP: the connection stays open, nothing comes back), so only the gateway's own limit
can end the call."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from gateway import EnvoyProcess, GatewaySettings, run_envoy
from tests.support.chat import TEST_SECRET, auth, token_for
from tests.support.processes import LoggedProcess, free_port, run_service
from tests.support.stack import chat_env

pytestmark = pytest.mark.e2e

LIMIT_S = 1.0
PATIENCE_S = 60.0
"""How long the test's clients wait: far beyond LIMIT_S, so only the gateway's limit ends a call."""


@dataclass
class StalledStack:
    envoy: EnvoyProcess
    replica: LoggedProcess


@pytest.fixture
async def stalled(tmp_path: Path, inference_address: str) -> AsyncIterator[StalledStack]:
    """Envoy (completion and unary limits of LIMIT_S) -> one chat replica, stopped once Envoy is up."""
    address = f"127.0.0.1:{free_port()}"
    database = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    settings = GatewaySettings(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        admin_port=free_port(),
        chat_addresses=[address],
        jwt_secret=TEST_SECRET,
        completion_timeout_s=LIMIT_S,
        unary_timeout_s=LIMIT_S,
        # The stopped replica stays in the pool: no health check fails while the test runs.
        health_check_interval_s=600,
        concurrency=1,
    )
    with run_service("chat_service", chat_env(address, database, inference_address), address, 60) as replica:
        async with run_envoy(settings, tmp_path / "envoy") as envoy:
            replica.send_signal(signal.SIGSTOP)
            try:
                yield StalledStack(envoy, replica)
            finally:
                replica.send_signal(signal.SIGCONT)


async def test_a_completion_past_completion_timeout_s_is_cut_by_the_gateway(stalled: StalledStack) -> None:
    headers = {"authorization": f"Bearer {token_for('timeout-user')}"}
    async with httpx.AsyncClient(base_url=stalled.envoy.base_url, timeout=PATIENCE_S) as http:
        response = await http.post("/chat", json={"content": "Hello?"}, headers=headers)
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "DEADLINE_EXCEEDED", response.text

    # A gRPC client without a deadline of its own gets the gateway's.
    async with grpc.aio.insecure_channel(stalled.envoy.listen_address) as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).CreateChat(
            pb.CreateChatRequest(content="Hello?"), metadata=auth("timeout-user")
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in call:
                pass
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value.details()


async def test_a_unary_call_past_unary_timeout_s_is_cut_by_the_gateway(stalled: StalledStack) -> None:
    headers = {"authorization": f"Bearer {token_for('timeout-user')}"}
    async with httpx.AsyncClient(base_url=stalled.envoy.base_url, timeout=PATIENCE_S) as http:
        response = await http.get("/chats", headers=headers)
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "DEADLINE_EXCEEDED", response.text
