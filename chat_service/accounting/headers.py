"""The `x-ratelimit-*-tokens` headers: what remains of the caller's most constraining token budget, on
every response of the public services, as OpenAI sends them (`x-ratelimit-limit-tokens`,
`x-ratelimit-remaining-tokens`, `x-ratelimit-reset-tokens`, the last a duration such as `6h0m0s`).

gRPC metadata becomes HTTP headers at Envoy. A success sends them as initial metadata, just before its
first response message; a refusal by a budget carries them in its trailers (`BudgetExhausted.metadata`),
which Envoy turns into the headers of the 429. They are left out when no budget limits the caller.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc

from chat_service.accounting.identity import current_caller
from chat_service.accounting.ledger import Ledger
from chat_service.accounting.token_headers import token_headers
from chatmesh.common.errors import ChatmeshError
from chatmesh.common.handlers import Context

log = logging.getLogger(__name__)


class BudgetHeadersInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Adds the token headers to every call of `services` (inside the identity interceptor, which says
    who calls)."""

    def __init__(self, ledger: Ledger, services: frozenset[str]) -> None:
        self._ledger = ledger
        self._services = services
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.lstrip("/").partition("/")[0] not in self._services:
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler))
            self._wrapped[method] = cached
        return cached[1]

    async def _headers(self) -> list[tuple[str, str]]:
        try:
            status = await self._ledger.header_status(current_caller().user_id)
        except ChatmeshError:
            return []
        except Exception:
            # The headers are a courtesy: a database hiccup here must not fail the call it decorates.
            log.warning("could not read the budget for the rate-limit headers", exc_info=True)
            return []
        return token_headers(status, datetime.now(UTC))

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        replaced: dict[str, Any] = {}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                replaced[kind] = self._wrap_behavior(behavior)
        return handler._replace(**replaced)  # type: ignore[attr-defined,no-any-return]

    def _wrap_behavior(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        headers = self._headers
        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
                sent = False
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        if not sent:
                            # Before the first message, not before the call: a refusal before any
                            # message stays a trailers-only response, whose trailers are the 429's
                            # headers.
                            sent = True
                            if metadata := await headers():
                                await context.send_initial_metadata(metadata)
                        yield response

            return streaming

        async def single(request: Any, context: Context) -> Any:
            result = behavior(request, context)
            response = await result if inspect.isawaitable(result) else result
            if metadata := await headers():
                await context.send_initial_metadata(metadata)
            return response

        return single
