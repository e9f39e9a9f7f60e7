"""The one place where domain errors become gRPC statuses on the server side."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

from chatmesh.common.errors import RETRY_AFTER_METADATA_KEY, ChatmeshError, ResourceExhausted

log = logging.getLogger(__name__)

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[Any, None]]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str) -> None:
    """Abort the call with the status that `exc` maps to; unexpected errors become INTERNAL."""
    if isinstance(exc, ChatmeshError):
        metadata: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, ResourceExhausted):
            metadata = ((RETRY_AFTER_METADATA_KEY, str(round(exc.retry_after_s * 1000))),)
        log.info(
            "request failed", extra={"method": method, "code": exc.status_code.name, "error": exc.message}
        )
        await context.abort(exc.status_code, exc.message, trailing_metadata=metadata)
    log.exception("unexpected error", extra={"method": method}, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps `ChatmeshError` raised by any servicer method to its gRPC status code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))  # type: ignore[attr-defined,no-any-return]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))  # type: ignore[attr-defined,no-any-return]
        return handler


def _wrap_unary(behavior: UnaryBehavior, method: str) -> UnaryBehavior:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc, method)

    return wrapped


def _wrap_stream(behavior: StreamBehavior, method: str) -> StreamBehavior:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncGenerator[Any, None]:
        try:
            # aclosing: when the client goes away and this wrapper is closed, close the servicer's
            # generator now (so it can clean up) rather than whenever it is garbage-collected.
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc, method)

    return wrapped
