"""Bad input through the real Envoy gateway: a 400 whose body names the field, in the standard shape.

A small stack of its own (inference service, one chat replica on SQLite, Envoy): REST requests whose
query string decodes to bytes that are not UTF-8 reach the chat service as undecodable protobuf, and
validation errors carry `google.rpc.BadRequest`, which Envoy's transcoder renders as the JSON body
(`{"code", "message", "details"}`). gRPC clients through Envoy get the same details in the trailer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.common.errors import InvalidArgument, error_from_rpc
from gateway import GatewaySettings, run_envoy
from tests.support.chat import TEST_SECRET, auth, token_for
from tests.support.processes import free_port
from tests.support.stack import chat_service, inference_service

pytestmark = pytest.mark.e2e

BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


@pytest.fixture(scope="module")
def chat_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = Path(tmp_path_factory.mktemp("chat")) / "chat.db"
    with (
        inference_service(standard=False, context_length=512) as inference,
        chat_service(f"sqlite+aiosqlite:///{database}", inference.address) as chat,
    ):
        yield chat.address


@pytest.fixture(scope="module")
async def gateway(chat_address: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    settings = GatewaySettings(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        admin_port=free_port(),
        chat_addresses=[chat_address],
        jwt_secret=TEST_SECRET,
    )
    async with run_envoy(settings, tmp_path_factory.mktemp("envoy")) as envoy:
        yield envoy.listen_address


@pytest.fixture
async def http(gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {token_for('ada')}"}
    async with httpx.AsyncClient(base_url=f"http://{gateway}", headers=headers, timeout=60.0) as client:
        yield client


def field_violations(body: dict[str, Any]) -> list[tuple[str, str]]:
    (details,) = body["details"]
    assert details["@type"] == BAD_REQUEST, body
    violations = details["field_violations"]  # proto field names, like every REST body
    return [(v["field"], v["description"]) for v in violations]


@pytest.mark.parametrize(
    ("path", "bad_field"),
    [
        ("/chats?page_token=%00%ff", "page_token"),
        ("/chat/%C3%28/messages", "chat_id"),
    ],
)
async def test_query_and_path_bytes_that_are_not_utf8_are_400(
    http: httpx.AsyncClient, path: str, bad_field: str
) -> None:
    reply = await http.get(path)
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["code"] == "INVALID_ARGUMENT" and body["message"].startswith(
        f"{bad_field}: is not valid UTF-8"
    ), body
    assert field_violations(body)[0][0] == bad_field


async def test_validation_errors_carry_bad_request_details(http: httpx.AsyncClient) -> None:
    reply = await http.get("/chats", params={"page_size": 100000})
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["code"] == "INVALID_ARGUMENT" and body["message"].startswith("page_size: "), body
    ((bad_field, description),) = field_violations(body)
    assert bad_field == "page_size" and body["message"] == f"page_size: {description}"


async def test_grpc_clients_through_envoy_get_the_details(gateway: str) -> None:
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListChats(pb.ListChatsRequest(page_size=100000), metadata=auth("ada"))
    error = error_from_rpc(err.value, "chat service")
    assert isinstance(error, InvalidArgument) and error.field == "page_size", error.message
