"""Domain errors shared by every service, and their mapping to and from gRPC statuses.

Servicers and backends raise these; one server interceptor (`chatmesh.common.grpc_errors`) turns them
into gRPC statuses with the standard `google.rpc` details (`rpc_status`), and clients turn statuses
back into them with `error_from_rpc` / `rpc_errors`, keeping the original `AioRpcError` as the cause.
Nothing else in the code base should catch-and-translate errors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]  # no py.typed


class ChatmeshError(Exception):
    """Base of all domain errors. `status_code` is the gRPC status the error maps to."""

    status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def status_details(self) -> list[Message]:
        """The `google.rpc` detail messages (BadRequest, RetryInfo, ...) that gRPC clients in any
        language read from the status; none by default."""
        return []

    def metadata(self) -> list[tuple[str, str]]:
        """Trailers of the status beside its details (e.g. rate-limit headers), which Envoy turns into
        the REST response's headers; none by default."""
        return []


class InvalidArgument(ChatmeshError):
    """The request is malformed; `field` names the offending field (e.g. `messages[2].role`) and
    `problem` says what is wrong with it and how to fix it."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def status_details(self) -> list[Message]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.problem)
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class NotFound(ChatmeshError):
    """The addressed resource does not exist, or belongs to someone else."""

    status_code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ChatmeshError):
    """The caller did not prove who they are."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ChatmeshError):
    """The caller is known (or need not be) but may not do this, from where it is or as who it is."""

    status_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ChatmeshError):
    """The service is at capacity; the caller should retry after `retry_after_s` seconds."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def status_details(self) -> list[Message]:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(self.retry_after_s * 1000))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class Unavailable(ChatmeshError):
    """A dependency (model engine, database, another service) cannot serve the request right now."""

    status_code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ChatmeshError):
    """The request is valid but this deployment or resource is not in a state to serve it (a feature
    switched off, say); the message says what to change."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ChatmeshError):
    """The caller's deadline passed before the work finished."""

    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


HTTP_RETRY_AFTER_METADATA_KEY = "retry-after"
"""Trailer with the retry delay in whole seconds (rounded up): HTTP's own `Retry-After` header, which
Envoy passes on to REST clients."""

RETRY_AFTER_METADATA_KEY = "retry-after-ms"
"""Trailer with the retry delay in milliseconds, beside RetryInfo, for clients and proxies that read
headers rather than status details."""

STATUS_DETAILS_METADATA_KEY = "grpc-status-details-bin"
"""Trailer carrying a serialized `google.rpc.Status` (code, message, details): what grpcio-status and the
gRPC libraries of other languages read, and what Envoy's transcoder renders as the REST error body."""

DEFAULT_RETRY_AFTER_S = 1.0
"""Assumed when a RESOURCE_EXHAUSTED status carries no delay (e.g. Envoy's own rate limiter)."""

_BY_STATUS: dict[grpc.StatusCode, type[ChatmeshError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}

_DetailT = TypeVar("_DetailT", bound=Message)


def rpc_status(error: ChatmeshError) -> status_pb2.Status:
    """The `google.rpc.Status` for `error`, with its details packed (sent as `grpc-status-details-bin`)."""
    status = status_pb2.Status(code=error.status_code.value[0], message=error.message)
    for detail in error.status_details():
        status.details.add().Pack(detail)
    return status


def rpc_status_details(exc: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    """The details of the `google.rpc.Status` a failed call carried, if any (and if it matches the call's
    status code: a proxy may have replaced the status and left the trailer behind)."""
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_METADATA_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                return []
            return list(status.details) if status.code == exc.code().value[0] else []
    return []


def _detail(details: Sequence[any_pb2.Any], detail_type: type[_DetailT]) -> _DetailT | None:
    for packed in details:
        detail = detail_type()
        if packed.TypeName() == detail.DESCRIPTOR.full_name and packed.Unpack(detail):
            return detail
    return None


def _retry_after_s(exc: grpc.aio.AioRpcError, details: Sequence[any_pb2.Any]) -> float:
    retry = _detail(details, error_details_pb2.RetryInfo)
    if retry is not None and retry.HasField("retry_delay"):
        delay_ms: int = retry.retry_delay.ToMilliseconds()
        return delay_ms / 1000
    trailer = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_METADATA_KEY)
    try:
        return int(str(trailer)) / 1000 if trailer is not None else DEFAULT_RETRY_AFTER_S
    except ValueError:
        return DEFAULT_RETRY_AFTER_S


def error_from_rpc(exc: grpc.aio.AioRpcError, service: str) -> ChatmeshError:
    """Translate a failed call to `service` into the domain error a caller of ours should see, with the
    rich details the status carried (`InvalidArgument.field`, `ResourceExhausted.retry_after_s`) and
    `exc` as its `__cause__` (so it stays attached however the result is raised)."""
    error = _error_from_rpc(exc, service)
    error.__cause__ = exc
    return error


def _error_from_rpc(exc: grpc.aio.AioRpcError, service: str) -> ChatmeshError:
    code = exc.code()
    message = exc.details() or code.name
    details = rpc_status_details(exc)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad_request = _detail(details, error_details_pb2.BadRequest)
        if bad_request is not None and bad_request.field_violations:
            violation = bad_request.field_violations[0]
            return InvalidArgument(violation.field, violation.description)
        # A server without details: our own message convention is "field: problem".
        field, _, problem = message.partition(": ")
        return InvalidArgument(field, problem) if problem else InvalidArgument("request", message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"{service} is at capacity: {message}", _retry_after_s(exc, details))
    error_type = _BY_STATUS.get(code)
    if error_type is not None:
        return error_type(message)
    # Anything else (INTERNAL, UNKNOWN, CANCELLED by the peer...) means the dependency failed us.
    return Unavailable(f"{service} failed ({code.name}): {message}")


@contextmanager
def rpc_errors(service: str) -> Iterator[None]:
    """Turn a failed gRPC call to `service` inside the block into the matching domain error, keeping the
    `AioRpcError` as the cause: `with rpc_errors("inference service"): await stub.Call(...)`."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, service) from exc


OPENAI_ERROR_TYPES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request_error",
    grpc.StatusCode.NOT_FOUND: "invalid_request_error",
    grpc.StatusCode.OUT_OF_RANGE: "invalid_request_error",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid_request_error",
    grpc.StatusCode.UNAUTHENTICATED: "authentication_error",
    grpc.StatusCode.PERMISSION_DENIED: "permission_error",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_error",
}
"""The `type` of an OpenAI-compatible error body by gRPC status (the gateway renders statuses with it,
the OpenAI servicer its mid-stream error events); any other status is a `server_error`."""
