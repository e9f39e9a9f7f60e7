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
- **Models.** `list_models()` names the models the mesh serves (the default first); `model=` picks
  one for a new chat (`stream`, `complete`, `create_chat`; default: the server's default) and
  `update_chat(chat_id, model=...)` switches a chat to another (its whole history goes to it). A model
  that is not served is `NotFound`, naming the ones that are; `Chat.model` and, for each reply,
  `ChatMessage.model` say which model it is.
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

from chatmesh.client.async_client import DEFAULT_TIMEOUT_S, AsyncChatClient, Token
from chatmesh.client.events import (
    SERVICE,
    Completion,
    CompletionDiverged,
    CompletionEvent,
    CompletionStream,
    Delta,
    Finished,
    FinishReason,
    Started,
    parse_event,
)
from chatmesh.client.options import (
    ChatOptions,
    CompletionOptions,
    HistoryStrategy,
    SamplingOptions,
    UpdateOptions,
)
from chatmesh.client.retry import NO_RETRY, RetryPolicy
from chatmesh.client.sync_client import ChatClient

# The package's modules: `events` (the typed events of a completion stream, and how a retried stream
# resumes), `retry` (the retry policy), `options` (the keyword arguments), `async_client` and
# `sync_client`. Everything a caller needs is importable from here, as when the SDK was one module.
__all__ = [
    "DEFAULT_TIMEOUT_S",
    "NO_RETRY",
    "SERVICE",
    "AsyncChatClient",
    "ChatClient",
    "ChatOptions",
    "Completion",
    "CompletionDiverged",
    "CompletionEvent",
    "CompletionOptions",
    "CompletionStream",
    "Delta",
    "FinishReason",
    "Finished",
    "HistoryStrategy",
    "RetryPolicy",
    "SamplingOptions",
    "Started",
    "Token",
    "UpdateOptions",
    "parse_event",
]
