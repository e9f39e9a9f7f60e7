"""One way for a server interceptor to wrap a gRPC method handler, whatever its kind.

A `grpc.RpcMethodHandler` carries one of four behaviors (unary_unary, unary_stream, stream_unary,
stream_stream). An interceptor that wraps only some of them lets the others through untouched: an
authentication check written for the unary-request kinds fails open the day someone adds a
client-streaming or bidi method. `wrap_handler` wraps every kind the same way, so each interceptor only
says what to do around a call (its *guard*), never how to wrap each kind.

It also makes undecodable requests a client error. gRPC deserializes the request before any handler or
interceptor code runs, so bytes that are not the expected message (a REST query parameter with invalid
UTF-8, transcoded by Envoy into a string field) would fail inside gRPC as UNKNOWN/INTERNAL, a 500. The
wrapped handler deserializes tolerantly and raises `InvalidArgument` naming the field instead, inside
the guards, so it is authenticated first and mapped to INVALID_ARGUMENT by the error interceptor.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message

from chatmesh.common.errors import InvalidArgument

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Guard: TypeAlias = Callable[[Context], AbstractAsyncContextManager[object]]
"""Entered around every call of the wrapped handler, in the handler's own task: for a streaming response,
around the whole stream. May raise (to reject the call), catch (to map errors) or set context variables
(visible to the servicer)."""

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def wrap_handler(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """`handler` with each of its behaviors run inside `guard(context)`, and undecodable requests
    raising `InvalidArgument` (inside the guard) instead of failing in gRPC.

    Handlers wrapped again (one interceptor around another) check the request only in the innermost
    wrapper, so every guard runs before the check: a caller without a token is UNAUTHENTICATED even
    when its request is garbage. A streaming-request servicer must read its requests from the request
    iterator it is given (not `context.read()`), which is where the check happens.
    """
    deserializer = handler.request_deserializer
    # The innermost wrapper is the one that finds the original deserializer still in place.
    check = deserializer is not None and not isinstance(deserializer, _TolerantDeserializer)
    replaced: dict[str, Any] = {}
    if check:
        replaced["request_deserializer"] = _TolerantDeserializer(deserializer)
    for kind in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            replaced[kind] = _wrap_behavior(behavior, guard, kind.startswith("stream_"), check)
    return handler._replace(**replaced)  # type: ignore[attr-defined,no-any-return]


class WrappedHandlers:
    """An interceptor's wrapped handlers by method: gRPC asks the interceptor for every call, and the
    registered handler of a method never changes, so the wrapping is paid for once per method."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self, method: str, handler: grpc.RpcMethodHandler, wrap: Callable[[], grpc.RpcMethodHandler]
    ) -> grpc.RpcMethodHandler:
        """The wrapped `handler` of `method`, made by `wrap()` unless it was made for this very handler."""
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap()
        self._by_method[method] = (handler, wrapped)
        return wrapped


def _wrap_behavior(
    behavior: Callable[..., Any], guard: Guard, request_streaming: bool, check: bool
) -> Callable[..., Any]:
    def argument(request: Any) -> Any:
        if not check:
            return request
        return _decoded_stream(request) if request_streaming else _decoded(request)

    # grpc.aio picks the calling convention by the kind of function it is given, so keep the servicer's:
    # an async generator for streamed responses, a coroutine for a single response (or for a servicer
    # that streams with `context.write`).
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            # aclosing: when the client goes away and this wrapper is closed, close the servicer's
            # generator now (so it can clean up) rather than whenever it is garbage-collected.
            async with (
                guard(context),
                contextlib.aclosing(behavior(argument(request), context)) as responses,
            ):
                async for response in responses:
                    yield response

        return streaming

    async def single(request: Any, context: Context) -> Any:
        async with guard(context):
            result = behavior(argument(request), context)
            return await result if inspect.isawaitable(result) else result

    return single


class _Undecodable:
    """What the tolerant deserializer returns for bytes that are not the expected message."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


class _TolerantDeserializer:
    """The handler's deserializer, returning `_Undecodable` instead of raising, so that the failure
    reaches the wrapped behavior (inside the interceptors' guards) rather than ending the call in gRPC."""

    def __init__(self, deserialize: Callable[[bytes], Any]) -> None:
        self._deserialize = deserialize

    def __call__(self, data: bytes) -> Any:
        try:
            return self._deserialize(data)
        except Exception:  # DecodeError, or whatever a custom deserializer raises: the bytes are bad
            return _Undecodable(undecodable_request(self._deserialize, data))


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise request.error
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def undecodable_request(deserialize: Callable[[bytes], Any], data: bytes) -> InvalidArgument:
    """The error for request bytes that `deserialize` rejected, naming the field when it can.

    Protobuf's own error says neither which field nor why; the usual cause is a string field holding
    bytes that are not UTF-8, which the wire format lets us find.
    """
    # Generated deserializers are `SomeMessage.FromString`, a class method of the message type.
    message_type = getattr(deserialize, "__self__", None)
    if isinstance(message_type, type) and issubclass(message_type, Message):
        descriptor = message_type.DESCRIPTOR
        field = _field_with_invalid_utf8(descriptor, data, "")
        if field is not None:
            return InvalidArgument(
                field, "is not valid UTF-8; send text as UTF-8 (in a URL, percent-encode its UTF-8 bytes)"
            )
        return InvalidArgument(
            "request", f"could not be decoded as a {descriptor.full_name} message; send a valid one"
        )
    return InvalidArgument("request", "could not be decoded; send a valid request message")


def _field_with_invalid_utf8(descriptor: Any, data: bytes, prefix: str) -> str | None:
    """The path (`messages[1].content`) of the first string field in `data` that is not UTF-8, if any.
    `descriptor` is the message's `google.protobuf.descriptor.Descriptor`."""
    counts: dict[int, int] = {}
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type != 2:  # not length-delimited: step over it (or give up on groups)
                if wire_type not in _FIXED_SIZES:
                    return None
                position = (
                    _varint(data, position)[1] if wire_type == 0 else position + _FIXED_SIZES[wire_type]
                )
                continue
            length, position = _varint(data, position)
            chunk, position = data[position : position + length], position + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if field.is_repeated:
                index = counts[number] = counts.get(number, -1) + 1
                name = f"{name}[{index}]"
            found = _invalid_utf8_in(field, chunk, name)
            if found is not None:
                return found
    except IndexError:
        return None  # truncated
    return None


_FIXED_SIZES = {0: 0, 1: 8, 5: 4}  # varint (size read from the data), fixed64, fixed32


def _invalid_utf8_in(field: Any, chunk: bytes, name: str) -> str | None:
    if field.type == pb_descriptor.FieldDescriptor.TYPE_STRING:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return name
        return None
    if field.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
        return _field_with_invalid_utf8(field.message_type, chunk, name + ".")
    return None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
