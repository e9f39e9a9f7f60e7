"""Helpers for driving the chat service over gRPC in tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import grpc

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.common.auth import JwtKeys, issue_token

TEST_SECRET = "test-secret-" + "x" * 40


def token_for(user: str, secret: str = TEST_SECRET) -> str:
    return issue_token(JwtKeys.hs256(secret), user)


def auth(user: str, secret: str = TEST_SECRET) -> tuple[tuple[str, str], ...]:
    """Call metadata authenticating as `user`."""
    return (("authorization", f"Bearer {token_for(user, secret)}"),)


@dataclass
class Completion:
    """Everything a completion stream produced."""

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
    """Read a whole completion stream, checking its shape: first, deltas, last."""
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


class ChatClient:
    """A ChatService stub bound to one user."""

    def __init__(self, channel: grpc.aio.Channel, user: str | None = None) -> None:
        self.user = user or f"user-{uuid.uuid4().hex[:8]}"
        self.stub = chat_pb2_grpc.ChatServiceStub(channel)
        self.metadata = auth(self.user)

    async def create(self, content: str = "", **fields: object) -> Completion:
        request = pb.CreateChatRequest(content=content, **fields)  # type: ignore[arg-type]
        return await drain(self.stub.CreateChat(request, metadata=self.metadata))

    async def complete(self, chat_id: str, content: str, **fields: object) -> Completion:
        request = pb.CompleteRequest(chat_id=chat_id, content=content, **fields)  # type: ignore[arg-type]
        return await drain(self.stub.Complete(request, metadata=self.metadata))

    async def messages(
        self, chat_id: str, page_size: int = 0, page_token: str = ""
    ) -> pb.GetMessagesResponse:
        request = pb.GetMessagesRequest(chat_id=chat_id, page_size=page_size, page_token=page_token)
        reply: pb.GetMessagesResponse = await self.stub.GetMessages(request, metadata=self.metadata)
        return reply

    async def all_messages(self, chat_id: str) -> list[pb.ChatMessage]:
        result: list[pb.ChatMessage] = []
        token = ""
        while True:
            page = await self.messages(chat_id, page_size=200, page_token=token)
            result.extend(page.messages)
            token = page.next_page_token
            if not token:
                return result

    async def list(self, page_size: int = 0, page_token: str = "") -> pb.ListChatsResponse:
        request = pb.ListChatsRequest(page_size=page_size, page_token=page_token)
        reply: pb.ListChatsResponse = await self.stub.ListChats(request, metadata=self.metadata)
        return reply
