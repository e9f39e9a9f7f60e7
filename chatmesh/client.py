"""The Python SDK of the chat API: a typed client for `chatmesh.chat.v1.ChatService` over gRPC.

Two flavours with the same methods: `AsyncChatClient` for asyncio code and `ChatClient`, a thin
blocking wrapper around it for scripts and notebooks. Both talk to the gateway (Envoy's port) or to a
chat replica directly::

    from chatmesh.client import ChatClient, Delta

    with ChatClient("127.0.0.1:8080", token=token) as client:
        reply = client.complete("What is the capital of France?", max_tokens=32)
        print(reply.text)
        for event in client.stream("And of Spain?", chat_id=reply.chat_id):
            if isinstance(event, Delta):
                print(event.text, end="", flush=True)

What the client does for you:

- **Authentication.** `token` (a JWT, or a callable returning a fresh one for each attempt) is sent as
  `authorization: Bearer <token>` metadata on every call.
- **Deadlines.** Every call has one: `timeout` for unary calls (default 30 s), `stream_timeout` for a
  whole completion (default none: a long reply may stream for minutes). Retries share the deadline of
  their call; they never extend it.
- **Retries that are safe.** UNAVAILABLE (connection lost, replica or engine down) and
  RESOURCE_EXHAUSTED (overload; the server's retry hint is honoured) are retried with exponential
  backoff (`RetryPolicy`). Every completion carries a `request_id` (one is generated when you do not
  pass one) and a retry reuses it, so the service stores the exchange once: a retry joins the running
  completion or returns the stored answer. Text the caller already received is not repeated.
- **Typed streams.** A completion is a stream of `Started`, `Delta` and `Finished` events
  (`CompletionEvent`); `complete` collects one into a `Completion`.
- **Errors are exceptions.** A failed call raises the domain error of `chatmesh.common.errors`
  (`InvalidArgument` with `.field`, `NotFound`, `Unauthenticated`, `ResourceExhausted` with
  `.retry_after_s`, `Unavailable`, `DeadlineExceeded`, ...), mapped by `error_from_rpc` with the
  `grpc.aio.AioRpcError` kept as `__cause__`. A failure after the stream started (an `error` event)
  raises the same exceptions.

Chats and messages are returned as the generated protobuf messages (`chatmesh.chat.v1.chat_pb2.Chat`,
`ChatMessage`), whose fields are documented in `protos/chatmesh/chat/v1/chat.proto`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeAlias, TypedDict, TypeVar, Unpack

import grpc

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.common.errors import ChatmeshError, Unavailable, error_from_rpc

__all__ = [
    "AsyncChatClient",
    "ChatClient",
    "Completion",
    "CompletionDiverged",
    "CompletionEvent",
    "CompletionStream",
    "Delta",
    "Finished",
    "RetryPolicy",
    "Started",
    "parse_event",
]

SERVICE = "chat service"
"""How error messages name the other side (`error_from_rpc`'s `service`)."""

DEFAULT_TIMEOUT_S = 30.0
"""Deadline of a unary call (list, read, update, delete) unless the client or the call says otherwise."""
# Methods take `timeout` (ruff's ASYNC109 prefers asyncio.timeout) because it becomes the gRPC
# deadline, which travels with the request so that the server stops working for a caller who gave up.

Token: TypeAlias = str | Callable[[], str]
HistoryStrategy: TypeAlias = pb.HistoryStrategy
FinishReason: TypeAlias = pb.FinishReason
_T = TypeVar("_T")

# Statuses after which the same request may succeed and cannot have been applied twice: the request
# either never reached a replica, or carries a request_id the service deduplicates on.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed calls are retried: up to `max_attempts` attempts in all (1 turns retries off),
    waiting `initial_backoff_s * multiplier**n` (capped at `max_backoff_s`, with jitter) in between,
    or the server's hint when it gives one (RESOURCE_EXHAUSTED's `retry_after_s`)."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoff_s(self, retry: int, error: ChatmeshError) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry) after `error`."""
        hint = getattr(error, "retry_after_s", None)
        if isinstance(hint, int | float) and hint > 0:
            return min(float(hint), self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        # Full jitter, so clients that failed together do not come back together.
        return random.uniform(ceiling / 2, ceiling)


NO_RETRY = RetryPolicy(max_attempts=1)
"""A policy that makes every call exactly once."""


# --- completion events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """First event of a completion: the chat and the stored user message."""

    chat_id: str
    user_message_id: str
    """Empty when a chat was created without a first message (`AsyncChatClient.create_chat`)."""
    chat: pb.Chat | None
    """The new chat, when the completion started one."""
    raw: pb.CompletionEvent = field(repr=False)
    """The event as it came over the wire."""


@dataclass(frozen=True, slots=True)
class Delta:
    """Text to append to the reply received so far."""

    text: str
    raw: pb.CompletionEvent = field(repr=False)


@dataclass(frozen=True, slots=True)
class Finished:
    """Last event of a successful completion: why it ended, what it cost, where it is stored."""

    finish_reason: FinishReason
    """`pb.FINISH_REASON_STOP`, `_LENGTH` (max_tokens reached) or `_CANCELLED`."""
    usage: pb.Usage
    assistant_message_id: str
    cached: bool
    """True when the reply came from the semantic cache."""
    raw: pb.CompletionEvent = field(repr=False)


CompletionEvent: TypeAlias = Started | Delta | Finished
"""One event of a completion stream, in the order Started, Delta*, Finished."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """The `error` event: the stream failed after it started. Never yielded; it becomes an exception."""

    code: str
    message: str


def parse_event(raw: pb.CompletionEvent) -> Started | Delta | Finished | _Failed:
    """The typed form of one wire event (exactly one kind per event, see chat.proto)."""
    if raw.HasField("error"):
        return _Failed(raw.error.code, raw.error.message)
    if raw.chat_id:
        return Started(raw.chat_id, raw.user_message_id, raw.chat if raw.HasField("chat") else None, raw)
    if raw.assistant_message_id:
        return Finished(raw.finish_reason, raw.usage, raw.assistant_message_id, raw.cached, raw)
    if raw.delta:
        return Delta(raw.delta, raw)
    raise Unavailable(f"{SERVICE} sent a completion event of no known kind: {raw}")


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole completion, as `complete` collects it."""

    chat_id: str
    user_message_id: str
    text: str
    finish_reason: FinishReason
    usage: pb.Usage
    assistant_message_id: str
    cached: bool
    request_id: str
    """The id the completion was sent with; sending it again returns this same completion."""
    chat: pb.Chat | None = None
    """The new chat, when this completion started one."""


class CompletionStream:
    """The typed events of one completion: iterate it with `async for`.

    Use it as an async context manager (`async with client.stream(...) as events:`) when you may stop
    before the end: leaving the block cancels the completion at once (the service keeps the partial
    reply, marked `FINISH_REASON_CANCELLED`), where an abandoned iterator would only be cancelled when
    garbage-collected.
    """

    def __init__(self, events: AsyncGenerator[CompletionEvent, None], request_id: str) -> None:
        self._events = events
        self.request_id = request_id
        """The id the completion is sent with (and retried with)."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> CompletionEvent:
        return await anext(self._events)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading; a completion still running is cancelled."""
        await self._events.aclose()

    async def collect(self) -> Completion:
        """Read the stream to its end and return it as one `Completion`."""
        started: Started | None = None
        pieces: list[str] = []
        async with self:
            async for event in self:
                if isinstance(event, Started):
                    started = event
                elif isinstance(event, Delta):
                    pieces.append(event.text)
                else:
                    assert started is not None  # the client yields Started first
                    return Completion(
                        chat_id=started.chat_id,
                        user_message_id=started.user_message_id,
                        text="".join(pieces),
                        finish_reason=event.finish_reason,
                        usage=event.usage,
                        assistant_message_id=event.assistant_message_id,
                        cached=event.cached,
                        request_id=self.request_id,
                        chat=started.chat,
                    )
        raise Unavailable(f"{SERVICE} ended the completion without a final event")


class CompletionDiverged(Unavailable):
    """A completion was retried after the text had started arriving, and the retry's reply does not
    continue what was already received (the first attempt died before its reply was stored and the
    reply was generated anew). The stored reply is the retried one; `received` is what was delivered
    before the retry."""

    def __init__(self, message: str, received: str) -> None:
        super().__init__(message)
        self.received = received


# --- keyword arguments ---------------------------------------------------------------------------------


class SamplingOptions(TypedDict, total=False):
    """The sampling keywords of `stream`, `complete` and `submit_job`; one left out or None takes the
    server's default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None


class CompletionOptions(SamplingOptions, total=False):
    """Keyword arguments of `stream` and `complete` (see `AsyncChatClient.stream`)."""

    chat_id: str | None
    title: str
    system_prompt: str
    history_strategy: HistoryStrategy
    request_id: str | None
    timeout: float | None
    skip_cache: bool


class ChatOptions(TypedDict, total=False):
    """Keyword arguments of `create_chat` (see `AsyncChatClient.create_chat`)."""

    title: str
    system_prompt: str
    history_strategy: HistoryStrategy
    request_id: str | None
    timeout: float | None


class UpdateOptions(TypedDict, total=False):
    """Keyword arguments of `update_chat` (see `AsyncChatClient.update_chat`)."""

    title: str | None
    system_prompt: str | None
    history_strategy: HistoryStrategy
    timeout: float | None


# --- the async client -----------------------------------------------------------------------------------


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
        retry: RetryPolicy = RetryPolicy(),
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

        Without `chat_id` a new chat is started (`title`, `system_prompt` and `history_strategy` apply
        to it; the title defaults to the first line of `content`); with it, the chat is continued.
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
        _check_keywords("stream", options, CompletionOptions.__optional_keys__)
        chat_id = options.get("chat_id")
        title = options.get("title", "")
        system_prompt = options.get("system_prompt", "")
        history_strategy = options.get("history_strategy", pb.HISTORY_STRATEGY_UNSPECIFIED)
        request_id = options.get("request_id") or str(uuid.uuid4())
        skip_cache = options.get("skip_cache", False)
        sampling = _sampling(options)
        request: pb.CreateChatRequest | pb.CompleteRequest
        if chat_id is None:
            request = pb.CreateChatRequest(
                content=content,
                title=title,
                system_prompt=system_prompt,
                history_strategy=history_strategy,
                request_id=request_id,
                skip_cache=skip_cache,
                **sampling,
            )
            method = self._stub.CreateChat
        else:
            if title or system_prompt or history_strategy:
                raise ValueError(
                    "title, system_prompt and history_strategy apply to a new chat; "
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
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.Chat:
        """Create an empty chat (no message, no reply) and return it. `request_id` makes it idempotent
        (default: a fresh UUID, reused by retries)."""
        request = pb.CreateChatRequest(
            title=title,
            system_prompt=system_prompt,
            history_strategy=history_strategy,
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
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.Chat:
        """Change what is given (None / UNSPECIFIED: unchanged) and return the chat after the change."""
        request = pb.UpdateChatRequest(chat_id=chat_id, history_strategy=history_strategy)
        if title is not None:
            request.title = title
        if system_prompt is not None:
            request.system_prompt = system_prompt
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
        _check_keywords("submit_job", sampling, SamplingOptions.__optional_keys__)
        request = pb.SubmitCompletionRequest(
            chat_id=chat_id,
            content=content,
            request_id=request_id or str(uuid.uuid4()),
            skip_cache=skip_cache,
            **_sampling(sampling),
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
        if exc.code() not in _RETRYABLE or retry >= self.retry.max_attempts:
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
                return await method(request, metadata=self._metadata(), timeout=_remaining(deadline))
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
        resumed = _Resumption()
        attempt = 0
        while True:
            attempt += 1
            resumed.next_attempt()
            failure: _Failed | None = None
            call = method(request, metadata=self._metadata(), timeout=_remaining(deadline))
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
                    raise _synthetic_rpc_error(failure.code, failure.message)
                if resumed.started is not None and not resumed.started.user_message_id:
                    return  # CreateChat without content: the Started event is the whole stream
                raise _synthetic_rpc_error("UNAVAILABLE", "the completion stream ended without a final event")
            except grpc.aio.AioRpcError as exc:
                await self._before_retry(attempt, exc, deadline)
            finally:
                # Leaving early (the caller stopped, or we raised): cancel, so the server stops too.
                call.cancel()


class _Resumption:
    """What the caller of a completion stream already has, so that a retry, which replays the
    completion from its start, continues the stream instead of repeating it."""

    def __init__(self) -> None:
        self.started: Started | None = None
        self.received = ""  # reply text already given to the caller
        self.replayed = ""  # reply text of the current attempt

    def next_attempt(self) -> None:
        self.replayed = ""

    def admit(self, event: CompletionEvent) -> CompletionEvent | None:
        """The event to give the caller for `event` (None: they have it already)."""
        if isinstance(event, Started):
            if self.started is None:
                self.started = event
                return event
            return None
        if self.started is None:
            raise Unavailable(f"{SERVICE} sent {event} before the completion's first event")
        if isinstance(event, Finished):
            if self.replayed != self.received:
                raise _diverged(self.received, self.replayed)
            return event
        self.replayed += event.text
        if not (self.replayed.startswith(self.received) or self.received.startswith(self.replayed)):
            raise _diverged(self.received, self.replayed)
        if len(self.replayed) <= len(self.received):
            return None
        fresh = self.replayed[len(self.received) :]
        self.received = self.replayed
        return event if fresh == event.text else Delta(fresh, event.raw)


def _sampling(options: SamplingOptions) -> dict[str, Any]:
    """The request fields of the sampling knobs that are set (unset ones take the server's default)."""
    given: Mapping[str, object] = options
    return {name: given[name] for name in SamplingOptions.__optional_keys__ if given.get(name) is not None}


def _check_keywords(method: str, options: Mapping[str, object], known: frozenset[str]) -> None:
    """Refuse a keyword argument `method` does not take, as Python does for a named parameter (a typo
    would otherwise be ignored without a word)."""
    unknown = sorted(options.keys() - known)
    if unknown:
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}")


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _synthetic_rpc_error(code_name: str, message: str) -> grpc.aio.AioRpcError:
    """An AioRpcError for a failure the server reported in-band, so that one mapper (`error_from_rpc`)
    and one retry rule handle it exactly like a failed status."""
    code = grpc.StatusCode.__members__.get(code_name, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)


def _diverged(received: str, replayed: str) -> CompletionDiverged:
    return CompletionDiverged(
        "the completion was retried and the retry's reply does not continue the text already received "
        f"({len(received)} characters; the retry sent {replayed[:80]!r}...); read the chat's messages "
        "for the stored reply",
        received,
    )


# --- the blocking client ----------------------------------------------------------------------------


class ChatClient:
    """Blocking twin of `AsyncChatClient`, for code without an event loop (scripts, notebooks, a REPL).

    Same arguments (except that `target` is an address) and methods; `stream` returns a plain iterator.
    It runs an `AsyncChatClient` on a private event loop, so do not call it from inside a running
    loop: there, use `AsyncChatClient`. Use it as a context manager, or call `close`.
    """

    def __init__(
        self,
        target: str,
        *,
        token: Token | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self._runner = asyncio.Runner()

        async def open_client() -> AsyncChatClient:
            # Created on the runner's loop: a grpc.aio channel belongs to the loop it was made on.
            return AsyncChatClient(
                target,
                token=token,
                credentials=credentials,
                timeout=timeout,
                stream_timeout=stream_timeout,
                retry=retry,
            )

        self._client = self._run(open_client())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and the private event loop."""
        try:
            self._run(self._client.close())
        finally:
            self._runner.close()

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self._runner.run(coroutine)

    def stream(self, content: str, **options: Unpack[CompletionOptions]) -> Iterator[CompletionEvent]:
        """`AsyncChatClient.stream`, as a blocking iterator. Stopping early cancels the completion."""
        events = self._client.stream(content, **options)

        async def next_event() -> CompletionEvent:
            return await anext(events)

        try:
            while True:
                try:
                    yield self._run(next_event())
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())

    def complete(self, content: str, **options: Unpack[CompletionOptions]) -> Completion:
        """`AsyncChatClient.complete`: send `content`, wait for the whole reply."""
        return self._run(self._client.complete(content, **options))

    def create_chat(self, **options: Unpack[ChatOptions]) -> pb.Chat:
        """`AsyncChatClient.create_chat`: an empty chat."""
        return self._run(self._client.create_chat(**options))

    def list_chats(
        self, page_size: int = 0, page_token: str = "", *, timeout: float | None = None
    ) -> pb.ListChatsResponse:
        """`AsyncChatClient.list_chats`: one page of chats."""
        return self._run(self._client.list_chats(page_size, page_token, timeout=timeout))

    def iter_chats(self, page_size: int = 100, *, timeout: float | None = None) -> Iterator[pb.Chat]:
        """`AsyncChatClient.iter_chats`: every chat, a page at a time."""
        token = ""
        while True:
            page = self.list_chats(page_size, token, timeout=timeout)
            yield from page.chats
            token = page.next_page_token
            if not token:
                return

    def get_messages(
        self, chat_id: str, page_size: int = 0, page_token: str = "", *, timeout: float | None = None
    ) -> pb.GetMessagesResponse:
        """`AsyncChatClient.get_messages`: one page of a chat's history."""
        return self._run(self._client.get_messages(chat_id, page_size, page_token, timeout=timeout))

    def iter_messages(
        self, chat_id: str, page_size: int = 200, *, timeout: float | None = None
    ) -> Iterator[pb.ChatMessage]:
        """`AsyncChatClient.iter_messages`: a chat's whole history, a page at a time."""
        token = ""
        while True:
            page = self.get_messages(chat_id, page_size, token, timeout=timeout)
            yield from page.messages
            token = page.next_page_token
            if not token:
                return

    def update_chat(self, chat_id: str, **options: Unpack[UpdateOptions]) -> pb.Chat:
        """`AsyncChatClient.update_chat`: change a chat's title, system prompt or history strategy."""
        return self._run(self._client.update_chat(chat_id, **options))

    def delete_chat(self, chat_id: str, *, timeout: float | None = None) -> None:
        """`AsyncChatClient.delete_chat`: delete a chat and its messages."""
        self._run(self._client.delete_chat(chat_id, timeout=timeout))

    def clear_cache(self, *, timeout: float | None = None) -> int:
        """`AsyncChatClient.clear_cache`: delete the caller's answers from the semantic cache."""
        return self._run(self._client.clear_cache(timeout=timeout))
