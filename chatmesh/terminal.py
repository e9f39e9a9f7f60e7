"""`chatmesh chat`: a terminal client for the mesh, through the gateway (gRPC on Envoy's port).

Interactive by default: each line you type is sent to the current chat and the reply streams back.
Commands start with a slash: /new, /list, /open CHAT_ID, /history, /delete CHAT_ID, /quit.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc

HELP = "commands: /new  /list  /open CHAT_ID  /history  /delete CHAT_ID  /quit   (anything else is a message)"


@dataclass
class ChatSession:
    """The state of one terminal session: who we are and which chat we are in."""

    stub: chat_pb2_grpc.ChatServiceStub
    metadata: tuple[tuple[str, str], ...]
    chat_id: str | None = None
    max_tokens: int = 256

    async def send(self, content: str) -> None:
        """Send `content` to the current chat (created if needed); print the reply as it streams."""
        if self.chat_id is None:
            events = self.stub.CreateChat(
                pb.CreateChatRequest(content=content, max_tokens=self.max_tokens), metadata=self.metadata
            )
        else:
            events = self.stub.Complete(
                pb.CompleteRequest(chat_id=self.chat_id, content=content, max_tokens=self.max_tokens),
                metadata=self.metadata,
            )
        await self._print_stream(events)

    async def _print_stream(self, events: AsyncIterator[pb.CompletionEvent]) -> None:
        async for event in events:
            if event.chat_id:
                self.chat_id = event.chat_id
            if event.delta:
                print(event.delta, end="", flush=True)
            if event.HasField("error"):
                print(f"\n[error {event.error.code}: {event.error.message}]")
            elif event.assistant_message_id:
                reason = pb.FinishReason.Name(event.finish_reason).removeprefix("FINISH_REASON_").lower()
                print(f"\n[{reason}, {event.usage.completion_tokens} tokens]")

    async def list_chats(self) -> None:
        token = ""
        while True:
            page = await self.stub.ListChats(
                pb.ListChatsRequest(page_size=50, page_token=token), metadata=self.metadata
            )
            for chat in page.chats:
                marker = "*" if chat.chat_id == self.chat_id else " "
                when = chat.last_activity_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
                print(f"{marker} {chat.chat_id}  {when}  {chat.title or '(untitled)'}")
            token = page.next_page_token
            if not token:
                return

    async def history(self) -> None:
        if self.chat_id is None:
            print("no chat open; /list then /open CHAT_ID")
            return
        token = ""
        while True:
            page = await self.stub.GetMessages(
                pb.GetMessagesRequest(chat_id=self.chat_id, page_size=200, page_token=token),
                metadata=self.metadata,
            )
            for message in page.messages:
                who = "you" if message.role == pb.ROLE_USER else "assistant"
                print(f"{who}: {message.content}")
            token = page.next_page_token
            if not token:
                return

    async def delete(self, chat_id: str) -> None:
        await self.stub.DeleteChat(pb.DeleteChatRequest(chat_id=chat_id), metadata=self.metadata)
        if chat_id == self.chat_id:
            self.chat_id = None
        print(f"deleted {chat_id}")

    async def handle(self, line: str) -> bool:
        """Run one input line; False when the user wants to quit."""
        command, _, argument = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/new":
            self.chat_id = None
            print("new chat: your next message starts it")
        elif command == "/list":
            await self.list_chats()
        elif command == "/open":
            self.chat_id = argument.strip()
            await self.history()
        elif command == "/history":
            await self.history()
        elif command == "/delete":
            await self.delete(argument.strip() or (self.chat_id or ""))
        elif command.startswith("/"):
            print(HELP)
        elif line.strip():
            await self.send(line.strip())
        return True


async def run_terminal(
    address: str, token: str, chat_id: str | None, message: str | None, list_only: bool, delete: str | None
) -> int:
    """Entry point of `chatmesh chat`. Returns the exit code."""
    async with grpc.aio.insecure_channel(address) as channel:
        session = ChatSession(
            chat_pb2_grpc.ChatServiceStub(channel), (("authorization", f"Bearer {token}"),), chat_id
        )
        try:
            if list_only:
                await session.list_chats()
                return 0
            if delete:
                await session.delete(delete)
                return 0
            if message:
                await session.send(message)
                print(f"[chat {session.chat_id}]")
                return 0
            print(f"chatmesh chat via {address}. {HELP}")
            while True:
                try:
                    line = await asyncio.to_thread(input, "\n> ")
                except EOFError:
                    return 0
                try:
                    if not await session.handle(line):
                        return 0
                except grpc.aio.AioRpcError as exc:
                    print(f"[{exc.code().name}: {exc.details()}]")
        except grpc.aio.AioRpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
