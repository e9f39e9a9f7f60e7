"""The client-side mapper: statuses (with or without google.rpc details) back to domain errors."""

from __future__ import annotations

import grpc
import pytest

from chatmesh.common.errors import (
    DEFAULT_RETRY_AFTER_S,
    ChatmeshError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
    rpc_errors,
    rpc_status,
)
from chatmesh.common.grpc_errors import trailing_metadata


def failed(
    code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str | bytes], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


def as_sent(error: ChatmeshError) -> grpc.aio.AioRpcError:
    """The failed call a client sees when a server raises `error` (the interceptor's status and trailers)."""
    return failed(error.status_code, error.message, trailing_metadata(error))


def test_invalid_argument_round_trips_through_bad_request_details() -> None:
    # A problem with ": " inside would be split wrongly by parsing the message; the details are exact.
    sent = InvalidArgument("messages[2].role", "unknown role 7: use ROLE_USER or ROLE_ASSISTANT")
    received = error_from_rpc(as_sent(sent), "inference service")
    assert isinstance(received, InvalidArgument)
    assert (received.field, received.problem, received.message) == (sent.field, sent.problem, sent.message)


def test_invalid_argument_without_details_is_parsed_from_the_message() -> None:
    received = error_from_rpc(failed(grpc.StatusCode.INVALID_ARGUMENT, "page_size: too big"), "chat")
    assert isinstance(received, InvalidArgument) and (received.field, received.problem) == (
        "page_size",
        "too big",
    )
    unnamed = error_from_rpc(failed(grpc.StatusCode.INVALID_ARGUMENT, "Bad JSON"), "chat")
    assert isinstance(unnamed, InvalidArgument) and unnamed.field == "request"


def test_retry_info_wins_over_the_header() -> None:
    rpc = failed(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "full",
        (*trailing_metadata(ResourceExhausted("full", 2.5))[:1], ("retry-after-ms", "9000")),
    )
    received = error_from_rpc(rpc, "inference service")
    assert isinstance(received, ResourceExhausted) and received.retry_after_s == 2.5
    assert received.message == "inference service is at capacity: full"


@pytest.mark.parametrize(
    ("trailers", "retry_after_s"),
    [
        ((("retry-after-ms", "250"),), 0.25),
        ((), DEFAULT_RETRY_AFTER_S),  # e.g. Envoy's own rate limiter
        ((("retry-after-ms", "soon"),), DEFAULT_RETRY_AFTER_S),
    ],
)
def test_retry_delay_without_retry_info(trailers: tuple[tuple[str, str], ...], retry_after_s: float) -> None:
    received = error_from_rpc(failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", trailers), "x")
    assert isinstance(received, ResourceExhausted) and received.retry_after_s == retry_after_s


def test_details_of_another_status_are_ignored() -> None:
    # A proxy replaced the status but kept the trailer: the details describe something else.
    stale = rpc_status(InvalidArgument("content", "must not be empty")).SerializeToString()
    rpc = failed(grpc.StatusCode.NOT_FOUND, "no chat", (("grpc-status-details-bin", stale),))
    assert isinstance(error_from_rpc(rpc, "chat"), NotFound)
    garbage = failed(grpc.StatusCode.INVALID_ARGUMENT, "a: b", (("grpc-status-details-bin", b"\xff"),))
    received = error_from_rpc(garbage, "chat")
    assert isinstance(received, InvalidArgument) and received.field == "a"


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, Unavailable),
        (grpc.StatusCode.UNKNOWN, Unavailable),
    ],
)
def test_status_codes_map_to_domain_errors(code: grpc.StatusCode, error_type: type[ChatmeshError]) -> None:
    rpc = failed(code, "why")
    received = error_from_rpc(rpc, "inference service")
    assert type(received) is error_type and "why" in received.message
    assert received.__cause__ is rpc


def test_rpc_errors_raises_the_domain_error_with_the_cause() -> None:
    rpc = failed(grpc.StatusCode.UNAVAILABLE, "connection refused")
    with pytest.raises(Unavailable) as err, rpc_errors("inference service"):
        raise rpc
    assert err.value.__cause__ is rpc
