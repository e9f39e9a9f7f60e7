"""`ChatClient`, the SDK's blocking client: an `AsyncChatClient` run on a private event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc

from chatmesh.chat.v1 import account_pb2 as account_pb
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.client.async_client import DEFAULT_TIMEOUT_S, AsyncChatClient, Token
from chatmesh.client.events import Completion, CompletionEvent
from chatmesh.client.options import ChatOptions, CompletionOptions, UpdateOptions
from chatmesh.client.retry import DEFAULT_RETRY, RetryPolicy

_T = TypeVar("_T")


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
        retry: RetryPolicy = DEFAULT_RETRY,
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

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        """`AsyncChatClient.list_models`: the models a chat can use, the default first."""
        return self._run(self._client.list_models(timeout=timeout))

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
        """`AsyncChatClient.update_chat`: change a chat's title, system prompt, history strategy or
        model."""
        return self._run(self._client.update_chat(chat_id, **options))

    def delete_chat(self, chat_id: str, *, timeout: float | None = None) -> None:
        """`AsyncChatClient.delete_chat`: delete a chat and its messages."""
        self._run(self._client.delete_chat(chat_id, timeout=timeout))

    def clear_cache(self, *, timeout: float | None = None) -> int:
        """`AsyncChatClient.clear_cache`: delete the caller's answers from the semantic cache."""
        return self._run(self._client.clear_cache(timeout=timeout))

    def usage(self, days: int = 30, *, timeout: float | None = None) -> account_pb.GetUsageResponse:
        """`AsyncChatClient.usage`: the caller's usage by day and model, and their budgets."""
        return self._run(self._client.usage(days, timeout=timeout))

    def create_key(
        self, name: str, *, scopes: Sequence[str] = (), expires_in_days: int = 0, timeout: float | None = None
    ) -> account_pb.CreateKeyResponse:
        """`AsyncChatClient.create_key`: make an API key (its secret is in the response, once)."""
        return self._run(
            self._client.create_key(name, scopes=scopes, expires_in_days=expires_in_days, timeout=timeout)
        )

    def list_keys(self, *, timeout: float | None = None) -> list[account_pb.ApiKey]:
        """`AsyncChatClient.list_keys`: the caller's API keys."""
        return self._run(self._client.list_keys(timeout=timeout))

    def revoke_key(self, key_id: str, *, timeout: float | None = None) -> account_pb.ApiKey:
        """`AsyncChatClient.revoke_key`: revoke one of the caller's keys."""
        return self._run(self._client.revoke_key(key_id, timeout=timeout))
