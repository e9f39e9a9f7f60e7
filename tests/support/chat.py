"""Helpers for driving the chat service over gRPC in tests, on top of the SDK (`chatmesh.client`).

`ChatClient` here is the SDK's `AsyncChatClient` bound to a test user, with two test-friendly
differences: it never retries (a test sees exactly what the service did), and a failed call raises the
`grpc.aio.AioRpcError` itself (the cause the SDK keeps), so tests can assert the exact status code and
details. Tests that want the SDK's domain exceptions use `ChatClient.sdk`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.client import NO_RETRY, AsyncChatClient, CompletionStream, Delta, Finished, Started
from chatmesh.common.auth import JwtKeys, issue_token
from chatmesh.common.errors import ChatmeshError

TEST_SECRET = "test-secret-" + "x" * 40
"""The HS256 secret every test chat service and gateway is started with."""


def token_for(user: str, secret: str = TEST_SECRET) -> str:
    """A fresh JWT for `user` (made when called, so it cannot expire while the suite runs)."""
    return issue_token(JwtKeys.hs256(secret), user)


def bearer(user: str, secret: str = TEST_SECRET) -> dict[str, str]:
    """HTTP headers authenticating as `user` (REST and OpenAI calls through the gateway)."""
    return {"authorization": f"Bearer {token_for(user, secret)}"}


def auth(user: str, secret: str = TEST_SECRET) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata authenticating as `user`: the same header as `bearer`."""
    return tuple(bearer(user, secret).items())


@dataclass
class Completion:
    """Everything a completion stream produced, as wire events."""

    first: pb.CompletionEvent
    deltas: list[str] = field(default_factory=list)
    last: pb.CompletionEvent | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def chat_id(self) -> str:
        return self.first.chat_id


async def drain(call: grpc.aio.UnaryStreamCall[object, pb.CompletionEvent]) -> Completion:
    """Read a whole raw completion stream, checking its shape: first, deltas, last."""
    events = [event async for event in call]
    assert events, "a completion stream has at least one event"
    completion = Completion(first=events[0])
    assert completion.first.chat_id, "the first event carries the chat id"
    for event in events[1:-1]:
        assert event.delta or not event.ListFields(), f"middle events are deltas, got {event}"
        completion.deltas.append(event.delta)
    if len(events) > 1:
        completion.last = events[-1]
        if events[-1].delta:
            completion.deltas.append(events[-1].delta)
    return completion


@contextlib.contextmanager
def grpc_errors() -> Iterator[None]:
    """Re-raise the SDK's domain errors as the `AioRpcError` they were mapped from."""
    try:
        yield
    except ChatmeshError as exc:
        if isinstance(exc.__cause__, grpc.aio.AioRpcError):
            raise exc.__cause__ from None
        raise


class ChatClient:
    """The chat API as one user, for tests (see the module docstring)."""

    def __init__(self, channel: grpc.aio.Channel, user: str | None = None) -> None:
        self.user = user or f"user-{uuid.uuid4().hex[:8]}"
        self.stub = chat_pb2_grpc.ChatServiceStub(channel)
        self.metadata = auth(self.user)
        self.sdk = AsyncChatClient(channel, token=lambda: token_for(self.user), retry=NO_RETRY)

    async def create(self, content: str = "", **fields: Any) -> Completion:
        """CreateChat: with `content`, the first message and its reply; without, an empty chat."""
        with grpc_errors():
            if not content:
                chat = await self.sdk.create_chat(**fields)
                return Completion(first=pb.CompletionEvent(chat_id=chat.chat_id, chat=chat))
            return await self._collect(self.sdk.stream(content, **fields))

    async def complete(self, chat_id: str, content: str, **fields: Any) -> Completion:
        """Complete: add `content` to the chat and read the reply."""
        with grpc_errors():
            return await self._collect(self.sdk.stream(content, chat_id=chat_id, **fields))

    @staticmethod
    async def _collect(events: CompletionStream) -> Completion:
        completion: Completion | None = None
        async with events:
            async for event in events:
                if isinstance(event, Started):
                    completion = Completion(first=event.raw)
                elif isinstance(event, Delta):
                    assert completion is not None
                    completion.deltas.append(event.text)
                elif isinstance(event, Finished):
                    assert completion is not None
                    completion.last = event.raw
        assert completion is not None, "a completion stream has at least one event"
        return completion

    async def messages(
        self, chat_id: str, page_size: int = 0, page_token: str = ""
    ) -> pb.GetMessagesResponse:
        """One page of a chat's history."""
        with grpc_errors():
            return await self.sdk.get_messages(chat_id, page_size, page_token)

    async def all_messages(self, chat_id: str) -> list[pb.ChatMessage]:
        """A chat's whole history."""
        with grpc_errors():
            return [message async for message in self.sdk.iter_messages(chat_id)]

    async def list(self, page_size: int = 0, page_token: str = "") -> pb.ListChatsResponse:
        """One page of the user's chats."""
        with grpc_errors():
            return await self.sdk.list_chats(page_size, page_token)
