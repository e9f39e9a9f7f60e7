"""Bytes that do not decode as the request message are INVALID_ARGUMENT naming the field, not INTERNAL.

The real chat service (on SQLite, with the real inference service behind it) gets hand-made request
bytes through a generic channel with no serializer, the way Envoy's transcoder forwards a REST query
parameter holding bytes that are not UTF-8 (`GET /chats?page_token=%00%ff`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.common.errors import InvalidArgument, error_from_rpc, rpc_status_details
from tests.support.chat import auth
from tests.support.stack import chat_service, inference_service

pytestmark = pytest.mark.integration

SERVICE = "/chatmesh.chat.v1.ChatService"


def field(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (value shorter than 128 bytes)."""
    assert len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


@pytest.fixture(scope="module")
def inference_address() -> Iterator[str]:
    with inference_service(standard=False, context_length=512) as inference:
        yield inference.address


@pytest.fixture(scope="module")
def chat_address(inference_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = Path(tmp_path_factory.mktemp("chat")) / "chat.db"
    with chat_service(f"sqlite+aiosqlite:///{database}", inference_address) as chat:
        yield chat.address
    assert chat.process.returncode == 0, chat.process.output_tail()


@pytest.fixture
async def channel(chat_address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(chat_address) as channel:
        yield channel


async def send(
    channel: grpc.aio.Channel, method: str, data: bytes, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.AioRpcError:
    """Send raw request bytes to a unary or server-streaming method and return how the call failed."""
    path = f"{SERVICE}/{method}"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if method in ("CreateChat", "Complete"):
            async for _ in channel.unary_stream(path)(data, metadata=metadata):
                pass
        else:
            await channel.unary_unary(path)(data, metadata=metadata)
    return err.value


@pytest.mark.parametrize(
    ("method", "data", "bad_field"),
    [
        # What Envoy sends for GET /chats?page_token=%00%ff.
        ("ListChats", field(2, b"\x00\xff"), "page_token"),
        ("GetMessages", field(1, b"\xc3\x28"), "chat_id"),
        ("CreateChat", field(4, "caf\u00e9".encode("latin-1")), "content"),
        ("Complete", field(1, b"0" * 8) + field(2, b"\xed\xa0\x80"), "content"),  # a UTF-16 surrogate
    ],
)
async def test_invalid_utf8_is_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel, method: str, data: bytes, bad_field: str
) -> None:
    err = await send(channel, method, data, auth("ada"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert (err.details() or "").startswith(f"{bad_field}: is not valid UTF-8"), err.details()
    bad_request = error_details_pb2.BadRequest()
    (details,) = rpc_status_details(err)
    assert details.Unpack(bad_request) and bad_request.field_violations[0].field == bad_field
    error = error_from_rpc(err, "chat service")
    assert isinstance(error, InvalidArgument) and error.field == bad_field


async def test_bytes_that_are_no_message_at_all_are_invalid_argument(channel: grpc.aio.Channel) -> None:
    err = await send(channel, "ListChats", b"\x12\x10truncated", auth("ada"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "chatmesh.chat.v1.ListChatsRequest" in (err.details() or "")


async def test_without_a_token_bad_bytes_are_still_unauthenticated(channel: grpc.aio.Channel) -> None:
    err = await send(channel, "ListChats", field(2, b"\x00\xff"), ())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()


async def test_the_service_keeps_serving_good_requests(channel: grpc.aio.Channel) -> None:
    await send(channel, "ListChats", field(2, b"\x00\xff"), auth("ada"))
    reply = await channel.unary_unary(
        f"{SERVICE}/ListChats",
        request_serializer=pb.ListChatsRequest.SerializeToString,
        response_deserializer=pb.ListChatsResponse.FromString,
    )(pb.ListChatsRequest(), metadata=auth("ada"))
    assert list(reply.chats) == []
