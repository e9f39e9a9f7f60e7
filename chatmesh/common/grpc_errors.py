"""The one place where domain errors become gRPC statuses on the server side."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from chatmesh.common.errors import (
    HTTP_RETRY_AFTER_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    STATUS_DETAILS_METADATA_KEY,
    ChatmeshError,
    ResourceExhausted,
    rpc_status,
)
from chatmesh.common.handlers import Context, WrappedHandlers, wrap_handler

log = logging.getLogger(__name__)


def trailing_metadata(error: ChatmeshError) -> tuple[tuple[str, str | bytes], ...]:
    """The trailers that carry `error`'s details: the standard `google.rpc.Status`; for a rejection with
    a retry delay, the `retry-after-ms` and `retry-after` headers that proxies and simple clients read;
    and whatever the error adds (`ChatmeshError.metadata`)."""
    metadata: list[tuple[str, str | bytes]] = [
        (STATUS_DETAILS_METADATA_KEY, rpc_status(error).SerializeToString())
    ]
    if isinstance(error, ResourceExhausted):
        metadata.append((RETRY_AFTER_METADATA_KEY, str(round(error.retry_after_s * 1000))))
        metadata.append((HTTP_RETRY_AFTER_METADATA_KEY, str(max(1, math.ceil(error.retry_after_s)))))
    metadata.extend(error.metadata())
    return tuple(metadata)


async def abort_with(context: Context, exc: BaseException, method: str) -> None:
    """Abort the call with the status that `exc` maps to; unexpected errors become INTERNAL."""
    if isinstance(exc, ChatmeshError):
        log.info(
            "request failed", extra={"method": method, "code": exc.status_code.name, "error": exc.message}
        )
        await context.abort(exc.status_code, exc.message, trailing_metadata=trailing_metadata(exc))
    log.exception("unexpected error", extra={"method": method}, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


@contextlib.asynccontextmanager
async def mapping_errors(context: Context, method: str) -> AsyncIterator[None]:
    """Abort the call with the status of any exception raised inside; aborts and cancellation (not
    `Exception`s) pass through."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await abort_with(context, exc, method)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps `ChatmeshError` raised by any servicer method (of any kind) to its gRPC status code."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        def guard(context: Context) -> contextlib.AbstractAsyncContextManager[Any]:
            return mapping_errors(context, method)

        return self._wrapped.get(method, handler, lambda: wrap_handler(handler, guard))
