"""Domain errors shared by every service, and their mapping to and from gRPC status codes.

Servicers and backends raise these; one server interceptor (`chatmesh.common.grpc_errors`) turns them
into gRPC statuses, and clients turn statuses back into them with `raise_for_rpc_error`, keeping the
original `AioRpcError` as the cause. Nothing else in the code base should catch-and-translate errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import grpc


class ChatmeshError(Exception):
    """Base of all domain errors. `status_code` is the gRPC status the error maps to."""

    status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ChatmeshError):
    """The request is malformed; `field` names the offending field (e.g. `messages[2].role`)."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ChatmeshError):
    """The addressed resource does not exist, or belongs to someone else."""

    status_code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ChatmeshError):
    """The caller did not prove who they are."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(ChatmeshError):
    """The service is at capacity; the caller should retry after `retry_after_s` seconds."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ChatmeshError):
    """A dependency (model engine, database, another service) cannot serve the request right now."""

    status_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ChatmeshError):
    """The caller's deadline passed before the work finished."""

    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


RETRY_AFTER_METADATA_KEY = "retry-after-ms"

_BY_STATUS: dict[grpc.StatusCode, type[ChatmeshError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_from_rpc(exc: grpc.aio.AioRpcError, service: str) -> ChatmeshError:
    """Translate a failed call to `service` into the domain error a caller of ours should see."""
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, problem = details.partition(": ")
        return InvalidArgument(field, problem) if problem else InvalidArgument("request", details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_ms = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_METADATA_KEY, "1000")
        return ResourceExhausted(f"{service} is at capacity: {details}", int(str(retry_ms)) / 1000)
    error_type = _BY_STATUS.get(code)
    if error_type is not None:
        return error_type(details)
    # Anything else (INTERNAL, UNKNOWN, CANCELLED by the peer...) means the dependency failed us.
    return Unavailable(f"{service} failed ({code.name}): {details}")


@contextmanager
def rpc_errors(service: str) -> Iterator[None]:
    """Turn a failed gRPC call to `service` inside the block into the matching domain error, keeping the
    `AioRpcError` as the cause: `with rpc_errors("inference service"): await stub.Call(...)`."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, service) from exc
