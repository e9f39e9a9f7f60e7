"""The auth and error interceptors cover every handler kind, on a real in-process grpc.aio server.

A small generic service has one method of each kind (unary-unary, unary-stream, stream-unary, bidi);
each replies with the authenticated user and raises the domain error a request asks for. The server is
the one every service builds (`create_server` with the JWT interceptor), so a kind the interceptors
missed would show up here as an unauthenticated or unmapped call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatmesh.common.auth import JwtAuthInterceptor, JwtKeys, current_user
from chatmesh.common.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    error_from_rpc,
)
from chatmesh.common.handlers import WrappedHandlers, undecodable_request, wrap_handler
from chatmesh.common.server import add_health_and_reflection, create_server, set_serving
from chatmesh.inference.v1 import inference_pb2 as ipb
from tests.support.chat import auth

SECRET = "k" * 40
KEYS = JwtKeys.hs256(SECRET)
SERVICE = "test.Echo"
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
Text = wrappers_pb2.StringValue
# A StringValue whose `value` (field 1, length-delimited) holds bytes that are not UTF-8.
INVALID_UTF8 = b"\x0a\x02\x00\xff"


def respond(text: Text) -> Text:
    """The reply to one request; `fail:<kind>` asks for that domain error, `crash` for a bug."""
    if text.value == "fail:invalid":
        raise InvalidArgument("value", "must not ask to fail; send something else")
    if text.value == "fail:exhausted":
        raise ResourceExhausted("no capacity", retry_after_s=1.5)
    if text.value == "crash":
        raise RuntimeError("a bug")
    return Text(value=f"{current_user()}:{text.value}")


async def unary_unary(request: Text, context: Any) -> Text:
    return respond(request)


async def unary_stream(request: Text, context: Any) -> AsyncIterator[Text]:
    yield Text(value="started")
    yield respond(request)


async def stream_unary(requests: AsyncIterator[Text], context: Any) -> Text:
    replies = [respond(request).value async for request in requests]
    return Text(value=",".join(replies))


async def stream_stream(requests: AsyncIterator[Text], context: Any) -> AsyncIterator[Text]:
    async for request in requests:
        yield respond(request)


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = create_server([JwtAuthInterceptor(KEYS)])
    factories: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    behaviors = {
        "unary_unary": unary_unary,
        "unary_stream": unary_stream,
        "stream_unary": stream_unary,
        "stream_stream": stream_stream,
    }
    handlers = {
        kind: factories[kind](
            behaviors[kind], request_deserializer=Text.FromString, response_serializer=Text.SerializeToString
        )
        for kind in KINDS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health = add_health_and_reflection(server, [SERVICE])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await set_serving(health, [SERVICE])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


async def call(
    channel: grpc.aio.Channel,
    kind: str,
    texts: list[str] | list[bytes],
    metadata: tuple[tuple[str, str], ...] = (),
) -> list[str]:
    """Call the `kind` method with `texts` (one request unless the kind streams requests); raw bytes are
    sent as they are. Returns the reply texts."""
    raw = bool(texts) and isinstance(texts[0], bytes)
    serializer = None if raw else Text.SerializeToString
    requests: list[Any] = list(texts) if raw else [Text(value=str(t)) for t in texts]
    path = f"/{SERVICE}/{kind}"
    factory = getattr(channel, kind)
    method = factory(path, request_serializer=serializer, response_deserializer=Text.FromString)
    argument: Any = requests[0] if kind.startswith("unary_") else _stream(requests)
    if kind.endswith("_unary"):
        return [(await method(argument, metadata=metadata)).value]
    return [reply.value async for reply in method(argument, metadata=metadata)]


async def _stream(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


@pytest.mark.parametrize("kind", KINDS)
async def test_every_kind_needs_a_token(channel: grpc.aio.Channel, kind: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, kind, ["hello"])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert isinstance(error_from_rpc(err.value, "test"), Unauthenticated)


@pytest.mark.parametrize("kind", KINDS)
async def test_every_kind_sees_the_authenticated_user(channel: grpc.aio.Channel, kind: str) -> None:
    replies = await call(channel, kind, ["hello"], auth("ada", SECRET))
    assert replies[-1] == "ada:hello"


@pytest.mark.parametrize("kind", ["stream_unary", "stream_stream"])
async def test_streamed_requests_are_all_served(channel: grpc.aio.Channel, kind: str) -> None:
    replies = await call(channel, kind, ["a", "b", "c"], auth("ada", SECRET))
    assert ",".join(replies) == "ada:a,ada:b,ada:c"


@pytest.mark.parametrize("kind", KINDS)
async def test_invalid_argument_carries_bad_request_details(channel: grpc.aio.Channel, kind: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, kind, ["fail:invalid"], auth("ada", SECRET))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "value: must not ask to fail; send something else"
    status = status_of(err.value)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("value", "must not ask to fail; send something else")
    ]
    error = error_from_rpc(err.value, "test")
    assert isinstance(error, InvalidArgument)
    assert (error.field, error.problem) == ("value", "must not ask to fail; send something else")
    assert error.__cause__ is err.value


@pytest.mark.parametrize("kind", KINDS)
async def test_resource_exhausted_carries_retry_info_and_header(channel: grpc.aio.Channel, kind: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, kind, ["fail:exhausted"], auth("ada", SECRET))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata())["retry-after-ms"] == "1500"
    retry = error_details_pb2.RetryInfo()
    assert status_of(err.value).details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 1500
    error = error_from_rpc(err.value, "test")
    assert isinstance(error, ResourceExhausted) and error.retry_after_s == 1.5


@pytest.mark.parametrize("kind", KINDS)
async def test_unexpected_errors_are_internal_without_details(channel: grpc.aio.Channel, kind: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, kind, ["crash"], auth("ada", SECRET))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in (err.value.details() or ""), "internals stay in the server log"


@pytest.mark.parametrize("kind", KINDS)
async def test_undecodable_requests_are_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel, kind: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, kind, [INVALID_UTF8], auth("ada", SECRET))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert (err.value.details() or "").startswith("value: is not valid UTF-8"), err.value.details()
    error = error_from_rpc(err.value, "test")
    assert isinstance(error, InvalidArgument) and error.field == "value"


@pytest.mark.parametrize("kind", KINDS)
async def test_authentication_comes_before_decoding(channel: grpc.aio.Channel, kind: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, kind, [INVALID_UTF8])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()


async def test_a_bad_message_later_in_a_stream_fails_the_call_after_the_good_ones(
    channel: grpc.aio.Channel,
) -> None:
    good = Text(value="fine").SerializeToString()
    method = channel.stream_stream(f"/{SERVICE}/stream_stream", response_deserializer=Text.FromString)
    replies: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for reply in method(_stream([good, INVALID_UTF8, good]), metadata=auth("ada", SECRET)):
            replies.append(reply.value)
    assert replies == ["ada:fine"]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_needs_no_token(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def status_of(exc: grpc.aio.AioRpcError) -> Any:
    (value,) = [v for k, v in exc.trailing_metadata() if k == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(value)
    assert (status.code, status.message) == (exc.code().value[0], exc.details())
    return status


def nested_invalid_utf8() -> Iterator[tuple[bytes, str]]:
    good = ipb.Message(role=ipb.ROLE_USER, content="hi").SerializeToString()
    bad = b"\x12\x01\xff"  # content (field 2) = one byte that is not UTF-8
    request = ipb.GenerateRequest(request_id="r").SerializeToString()
    # messages (field 1) twice: the second message is the bad one.
    messages = b"".join(b"\x0a" + bytes([len(m)]) + m for m in (good, bad))
    yield request + messages, "messages[1].content"
    stop = b"\x22\x02ok\x22\x01\xfe"  # SamplingParams.stop (field 4): ["ok", b"\xfe"]
    yield b"\x12" + bytes([len(stop)]) + stop, "sampling.stop[1]"


@pytest.mark.parametrize(("data", "field"), list(nested_invalid_utf8()))
def test_the_field_with_invalid_utf8_is_named_however_deep(data: bytes, field: str) -> None:
    with pytest.raises(Exception, match="parsing"):
        ipb.GenerateRequest.FromString(data)
    error = undecodable_request(ipb.GenerateRequest.FromString, data)
    assert error.field == field, error.message


def test_other_undecodable_bytes_name_the_request() -> None:
    error = undecodable_request(ipb.GenerateRequest.FromString, b"\x0a\x05ab")  # truncated
    assert error.field == "request" and "chatmesh.inference.v1.GenerateRequest" in error.problem


def test_a_method_is_wrapped_once_however_often_it_is_called() -> None:
    wrapped = WrappedHandlers()
    handler = grpc.unary_unary_rpc_method_handler(unary_unary)
    made: list[grpc.RpcMethodHandler] = []

    def wrap() -> grpc.RpcMethodHandler:
        made.append(wrap_handler(handler, JwtAuthInterceptor(KEYS)._authenticated))
        return made[-1]

    first = wrapped.get("/test.Echo/A", handler, wrap)
    assert wrapped.get("/test.Echo/A", handler, wrap) is first and len(made) == 1
    # A different handler registered under the name (a server rebuilt in the same process) is wrapped anew.
    other = grpc.unary_unary_rpc_method_handler(unary_unary)
    assert wrapped.get("/test.Echo/A", other, wrap) is not first and len(made) == 2
