"""`AsyncChatClient`, the SDK's asyncio client (see the package docstring for what it does for you)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeAlias, Unpack

import grpc

from chatmesh.chat.v1 import account_pb2 as account_pb
from chatmesh.chat.v1 import account_pb2_grpc, chat_pb2_grpc
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.client.events import (
    SERVICE,
    Completion,
    CompletionEvent,
    CompletionStream,
    Finished,
    Resumption,
    Started,
    _Failed,
    parse_event,
)
from chatmesh.client.options import (
    CompletionOptions,
    HistoryStrategy,
    SamplingOptions,
    check_keywords,
    sampling_fields,
)
from chatmesh.client.retry import DEFAULT_RETRY, RETRYABLE, RetryPolicy, remaining, synthetic_rpc_error
from chatmesh.common.errors import Unavailable, error_from_rpc

DEFAULT_TIMEOUT_S = 30.0
"""Deadline of a unary call (list, read, update, delete) unless the client or the call says otherwise."""
# Methods take `timeout` (ruff's ASYNC109 prefers asyncio.timeout) because it becomes the gRPC
# deadline, which travels with the request so that the server stops working for a caller who gave up.

Token: TypeAlias = str | Callable[[], str]


class AsyncChatClient:
    """Async client of the chat API. Use it as an async context manager (or call `close`).

    `target` is an address (`"127.0.0.1:8080"`: the gateway, or a chat replica), over TLS when
    `credentials` are given, or an open `grpc.aio.Channel`, which the client then uses but does not
    close. `token` is a JWT or a callable returning one (called for every attempt, so it may refresh).
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        token: Token | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if isinstance(target, str):
            self._channel = (
                grpc.aio.secure_channel(target, credentials)
                if credentials is not None
                else grpc.aio.insecure_channel(target)
            )
            self._owns_channel = True
        else:
            self._channel = target
            self._owns_channel = False
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._account = account_pb2_grpc.AccountServiceStub(self._channel)
        self._token = token
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retry = retry

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (if the client opened it); calls in flight are cancelled."""
        if self._owns_channel:
            await self._channel.close()

    # --- completions -------------------------------------------------------------------------------

    def stream(self, content: str, **options: Unpack[CompletionOptions]) -> CompletionStream:
        """Send `content` and stream the reply as typed events: `Started`, then `Delta`s, then `Finished`.

        Without `chat_id` a new chat is started (`title`, `system_prompt`, `history_strategy` and
        `model` apply to it; the title defaults to the first line of `content`, the model to the
        server's default, see `list_models`); with it, the chat is continued with the chat's model.
        Sampling: `max_tokens` (server default when None), `temperature` (0 to 2), `top_p`, `seed`.
        `request_id` makes the completion idempotent (default: a fresh UUID); retries reuse it.
        `timeout` bounds the whole stream (default: the client's `stream_timeout`; `math.inf`: none).
        `skip_cache=True`: the model answers even if the semantic cache holds an answer, and the answer
        is not cached (`Finished.cached` says whether a reply came from the cache). Every keyword is
        optional (`CompletionOptions`).

        Stopping early cancels the completion (see `CompletionStream`); the service keeps the partial
        reply, marked `FINISH_REASON_CANCELLED`. Failures raise (see the module docstring), also
        mid-stream.
        """
        check_keywords("stream", options, CompletionOptions.__optional_keys__)
        chat_id = options.get("chat_id")
        title = options.get("title", "")
        system_prompt = options.get("system_prompt", "")
        history_strategy = options.get("history_strategy", pb.HISTORY_STRATEGY_UNSPECIFIED)
        model = options.get("model", "")
        request_id = options.get("request_id") or str(uuid.uuid4())
        skip_cache = options.get("skip_cache", False)
        sampling = sampling_fields(options)
        request: pb.CreateChatRequest | pb.CompleteRequest
        if chat_id is None:
            request = pb.CreateChatRequest(
                content=content,
                title=title,
                system_prompt=system_prompt,
                history_strategy=history_strategy,
                model=model,
                request_id=request_id,
                skip_cache=skip_cache,
                **sampling,
            )
            method = self._stub.CreateChat
        else:
            if title or system_prompt or history_strategy or model:
                raise ValueError(
                    "title, system_prompt, history_strategy and model apply to a new chat; "
                    "use update_chat to change an existing one"
                )
            request = pb.CompleteRequest(
                chat_id=chat_id, content=content, request_id=request_id, skip_cache=skip_cache, **sampling
            )
            method = self._stub.Complete
        deadline = self._deadline(options.get("timeout"), self.stream_timeout)
        return CompletionStream(self._completion(method, request, deadline), request_id)

    async def complete(self, content: str, **options: Unpack[CompletionOptions]) -> Completion:
        """Like `stream`, but wait for the whole reply and return it as one `Completion`."""
        return await self.stream(content, **options).collect()

    async def create_chat(
        self,
        *,
        title: str = "",
        system_prompt: str = "",
        history_strategy: HistoryStrategy = pb.HISTORY_STRATEGY_UNSPECIFIED,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.Chat:
        """Create an empty chat (no message, no reply) and return it. `model` is one `list_models`
        names ("": the default; one not served is `NotFound`, naming those that are). `request_id`
        makes it idempotent (default: a fresh UUID, reused by retries)."""
        request = pb.CreateChatRequest(
            title=title,
            system_prompt=system_prompt,
            history_strategy=history_strategy,
            model=model,
            request_id=request_id or str(uuid.uuid4()),
        )
        events = self._completion(self._stub.CreateChat, request, self._deadline(timeout, self.timeout))
        chat: pb.Chat | None = None
        async for event in CompletionStream(events, request.request_id):
            if not isinstance(event, Started) or event.chat is None or chat is not None:
                raise Unavailable(f"{SERVICE} answered CreateChat without content with {event}")
            chat = event.chat
        if chat is None:
            raise Unavailable(f"{SERVICE} answered CreateChat with an empty stream")
        return chat

    # --- models ---------------------------------------------------------------------------------------

    async def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:  # noqa: ASYNC109
        """The models a chat can use (`models`, the default first, with their context lengths) and
        `default_model`, the one a new chat gets when it names none."""
        reply: pb.ListModelsResponse = await self._unary(
            self._stub.ListModels, pb.ListModelsRequest(), timeout
        )
        return reply

    # --- chats and messages ------------------------------------------------------------------------------

    async def list_chats(
        self,
        page_size: int = 0,
        page_token: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.ListChatsResponse:
        """One page of the caller's chats, most recent activity first. `page_size` 1 to 100 (0: the
        server's default, 20); pass the previous page's `next_page_token` for the next page."""
        request = pb.ListChatsRequest(page_size=page_size, page_token=page_token)
        reply: pb.ListChatsResponse = await self._unary(self._stub.ListChats, request, timeout)
        return reply

    async def iter_chats(
        self,
        page_size: int = 100,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[pb.Chat]:
        """Every chat of the caller, most recent activity first, fetched a page at a time."""
        token = ""
        while True:
            page = await self.list_chats(page_size, token, timeout=timeout)
            for chat in page.chats:
                yield chat
            token = page.next_page_token
            if not token:
                return

    async def get_messages(
        self,
        chat_id: str,
        page_size: int = 0,
        page_token: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.GetMessagesResponse:
        """One page of a chat's history, oldest first. `page_size` 1 to 200 (0: the server's default,
        50); pass the previous page's `next_page_token` for the next page."""
        request = pb.GetMessagesRequest(chat_id=chat_id, page_size=page_size, page_token=page_token)
        reply: pb.GetMessagesResponse = await self._unary(self._stub.GetMessages, request, timeout)
        return reply

    async def iter_messages(
        self,
        chat_id: str,
        page_size: int = 200,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[pb.ChatMessage]:
        """The whole history of a chat, oldest first, fetched a page at a time."""
        token = ""
        while True:
            page = await self.get_messages(chat_id, page_size, token, timeout=timeout)
            for message in page.messages:
                yield message
            token = page.next_page_token
            if not token:
                return

    async def update_chat(
        self,
        chat_id: str,
        *,
        title: str | None = None,
        system_prompt: str | None = None,
        history_strategy: HistoryStrategy = pb.HISTORY_STRATEGY_UNSPECIFIED,
        model: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.Chat:
        """Change what is given (None / UNSPECIFIED: unchanged) and return the chat after the change.
        A new `model` answers the chat's next turns, the whole history included (`NotFound` if it is
        not served)."""
        request = pb.UpdateChatRequest(chat_id=chat_id, history_strategy=history_strategy)
        if title is not None:
            request.title = title
        if system_prompt is not None:
            request.system_prompt = system_prompt
        if model is not None:
            request.model = model
        reply: pb.UpdateChatResponse = await self._unary(self._stub.UpdateChat, request, timeout)
        return reply.chat

    async def delete_chat(self, chat_id: str, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Delete a chat and its messages. `NotFound` if there is no such chat of the caller's; a retry
        that finds the chat gone treats it as deleted by the attempt that lost its answer."""
        request = pb.DeleteChatRequest(chat_id=chat_id)
        await self._unary(self._stub.DeleteChat, request, timeout, not_found_on_retry_is_done=True)

    async def clear_cache(self, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Delete every answer the caller's completions left in the semantic cache; returns how many."""
        reply: pb.ClearCacheResponse = await self._unary(
            self._stub.ClearCache, pb.ClearCacheRequest(), timeout
        )
        return reply.deleted_entries

    # --- asynchronous jobs ---------------------------------------------------------------------------

    async def submit_job(
        self,
        chat_id: str,
        content: str,
        *,
        request_id: str | None = None,
        skip_cache: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
        **sampling: Unpack[SamplingOptions],
    ) -> pb.Job:
        """Queue the reply to `content` in chat `chat_id` as a job and return it at once (state QUEUED);
        a worker answers it later. `ResourceExhausted` when the queue is full (nothing is stored). The
        `request_id` (default: a fresh UUID) makes retries of the submission return the same job.
        Sampling keywords as for `stream` (`SamplingOptions`)."""
        check_keywords("submit_job", sampling, SamplingOptions.__optional_keys__)
        request = pb.SubmitCompletionRequest(
            chat_id=chat_id,
            content=content,
            request_id=request_id or str(uuid.uuid4()),
            skip_cache=skip_cache,
            **sampling_fields(sampling),
        )
        job: pb.Job = await self._unary(self._stub.SubmitCompletion, request, timeout)
        return job

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:  # noqa: ASYNC109
        """One of the caller's jobs, with its reply once stored (`NotFound` for anyone else's)."""
        job: pb.Job = await self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout)
        return job

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> CompletionStream:
        """The job's reply as a completion stream: live while it runs, or the stored reply; a failed job
        raises its error."""
        request = pb.WatchJobRequest(job_id=job_id)
        deadline = self._deadline(timeout, self.stream_timeout)
        return CompletionStream(self._completion(self._stub.WatchJob, request, deadline), job_id)

    # --- usage and API keys -----------------------------------------------------------------------------

    async def usage(self, days: int = 30, *, timeout: float | None = None) -> account_pb.GetUsageResponse:  # noqa: ASYNC109
        """The caller's token usage by day and model over the last `days` days, and what remains of each
        of their budgets."""
        reply: account_pb.GetUsageResponse = await self._unary(
            self._account.GetUsage, account_pb.GetUsageRequest(days=days), timeout
        )
        return reply

    async def create_key(
        self,
        name: str,
        *,
        scopes: Sequence[str] = (),
        expires_in_days: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> account_pb.CreateKeyResponse:
        """Make an API key for the caller (needs a sign-in token, not a key). `scopes`: any of "chat",
        "openai", "usage" (none: all of them); `expires_in_days` 0: never. The response's `secret` is the
        bearer to use, shown this once. Not retried: a retry after a lost answer would make a second key."""
        request = account_pb.CreateKeyRequest(
            name=name,
            scopes=[f"KEY_SCOPE_{scope.upper()}" for scope in scopes],
            expires_in_days=expires_in_days,
        )
        deadline = self._deadline(timeout, self.timeout)
        try:
            reply: account_pb.CreateKeyResponse = await self._account.CreateKey(
                request, metadata=self._metadata(), timeout=remaining(deadline)
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, SERVICE) from exc
        return reply

    async def list_keys(self, *, timeout: float | None = None) -> list[account_pb.ApiKey]:  # noqa: ASYNC109
        """The caller's API keys, newest first, revoked ones included (never their secrets)."""
        reply: account_pb.ListKeysResponse = await self._unary(
            self._account.ListKeys, account_pb.ListKeysRequest(), timeout
        )
        return list(reply.keys)

    async def revoke_key(self, key_id: str, *, timeout: float | None = None) -> account_pb.ApiKey:  # noqa: ASYNC109
        """Revoke one of the caller's keys: every replica refuses it within seconds. Revoking twice is
        harmless."""
        reply: account_pb.RevokeKeyResponse = await self._unary(
            self._account.RevokeKey, account_pb.RevokeKeyRequest(key_id=key_id), timeout
        )
        return reply.key

    # --- machinery -----------------------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token is None:
            return ()
        token = self._token() if callable(self._token) else self._token
        return (("authorization", f"Bearer {token}"),)

    def _deadline(self, timeout: float | None, default: float | None) -> float | None:
        """Monotonic deadline of a call: `timeout` (None: `default`) seconds from now; None for none."""
        seconds = default if timeout is None else timeout
        return None if seconds is None or math.isinf(seconds) else time.monotonic() + seconds

    async def _before_retry(self, retry: int, exc: grpc.aio.AioRpcError, deadline: float | None) -> None:
        """Raise the mapped error unless `exc` may be retried now; otherwise wait the backoff."""
        error = error_from_rpc(exc, SERVICE)
        if exc.code() not in RETRYABLE or retry >= self.retry.max_attempts:
            raise error from exc
        pause = self.retry.backoff_s(retry, error)
        if deadline is not None and time.monotonic() + pause >= deadline:
            raise error from exc  # no time left for another attempt
        await asyncio.sleep(pause)

    async def _unary(
        self,
        method: Callable[..., Any],
        request: Any,
        timeout: float | None,  # noqa: ASYNC109
        *,
        not_found_on_retry_is_done: bool = False,
    ) -> Any:
        deadline = self._deadline(timeout, self.timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, metadata=self._metadata(), timeout=remaining(deadline))
            except grpc.aio.AioRpcError as exc:
                if not_found_on_retry_is_done and attempt > 1 and exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                await self._before_retry(attempt, exc, deadline)

    async def _completion(
        self, method: Callable[..., Any], request: Any, deadline: float | None
    ) -> AsyncGenerator[CompletionEvent, None]:
        """The typed events of one completion, retried on UNAVAILABLE / RESOURCE_EXHAUSTED with the same
        request (hence the same request_id). A retry replays the completion from its start (joined or
        stored); what the caller already has is skipped, so the events read as one uninterrupted stream."""
        resumed = Resumption()
        attempt = 0
        while True:
            attempt += 1
            resumed.next_attempt()
            failure: _Failed | None = None
            call = method(request, metadata=self._metadata(), timeout=remaining(deadline))
            try:
                async for raw in call:
                    event = parse_event(raw)
                    if isinstance(event, _Failed):
                        failure = event  # the status follows, with the details; read on
                        continue
                    if failure is not None:
                        raise Unavailable(f"{SERVICE} sent {raw} after an error event")
                    fresh = resumed.admit(event)
                    if fresh is not None:
                        yield fresh
                    if isinstance(event, Finished):
                        return
                if failure is not None:
                    # An error event, then status OK: still a failure, with the event's code.
                    raise synthetic_rpc_error(failure.code, failure.message)
                if resumed.started is not None and not resumed.started.user_message_id:
                    return  # CreateChat without content: the Started event is the whole stream
                raise synthetic_rpc_error("UNAVAILABLE", "the completion stream ended without a final event")
            except grpc.aio.AioRpcError as exc:
                await self._before_retry(attempt, exc, deadline)
            finally:
                # Leaving early (the caller stopped, or we raised): cancel, so the server stops too.
                call.cancel()
