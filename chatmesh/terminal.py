"""`chatmesh chat`: a terminal client for the mesh, through the gateway (gRPC on Envoy's port).

Interactive by default: each line you type is sent to the current chat and the reply streams back.
Commands start with a slash: /new, /list, /open CHAT_ID, /history, /delete CHAT_ID, /models,
/model NAME (the current chat's model, or the next new chat's), /usage (tokens used, budgets left), /quit.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from chatmesh.chat.v1 import account_pb2 as account_pb
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.client import AsyncChatClient, Delta, Finished, Started
from chatmesh.common.errors import ChatmeshError

HELP = (
    "commands: /new  /list  /open CHAT_ID  /history  /delete CHAT_ID  /models  /model NAME  /usage  /quit"
    "   (anything else is a message)"
)


@dataclass
class ChatSession:
    """The state of one terminal session: the client (who we are) and which chat we are in."""

    client: AsyncChatClient
    chat_id: str | None = None
    max_tokens: int = 256
    model: str = ""
    """The model of the next new chat ("": the server's default), or of the open chat when known."""

    async def send(self, content: str) -> None:
        """Send `content` to the current chat (created if needed); print the reply as it streams."""
        stream = (
            self.client.stream(content, chat_id=self.chat_id, max_tokens=self.max_tokens)
            if self.chat_id is not None
            else self.client.stream(content, model=self.model, max_tokens=self.max_tokens)
        )
        async with stream as events:
            try:
                async for event in events:
                    if isinstance(event, Started):
                        self.chat_id = event.chat_id
                        if event.chat is not None:
                            self.model = event.chat.model
                    elif isinstance(event, Delta):
                        print(event.text, end="", flush=True)
                    elif isinstance(event, Finished):
                        reason = pb.FinishReason.Name(event.finish_reason).removeprefix("FINISH_REASON_")
                        by = f", {self.model}" if self.model else ""
                        print(f"\n[{reason.lower()}, {event.usage.completion_tokens} tokens{by}]")
            except ChatmeshError:
                print()  # end the partial reply's line before the error is reported
                raise

    async def list_chats(self) -> None:
        async for chat in self.client.iter_chats(page_size=50):
            marker = "*" if chat.chat_id == self.chat_id else " "
            when = chat.last_activity_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
            model = f"  [{chat.model}]" if chat.model else ""
            print(f"{marker} {chat.chat_id}  {when}  {chat.title or '(untitled)'}{model}")

    async def history(self) -> None:
        if self.chat_id is None:
            print("no chat open; /list then /open CHAT_ID")
            return
        async for message in self.client.iter_messages(self.chat_id):
            if message.role == pb.ROLE_USER:
                who = "you"
            else:
                who = f"assistant ({message.model})" if message.model else "assistant"
            print(f"{who}: {message.content}")

    async def open(self, chat_id: str) -> None:
        """Make `chat_id` the current chat (its model too) and print its history."""
        self.chat_id = chat_id
        # No call reads one chat: its model comes from the list (and stays unknown if it is not there).
        self.model = ""
        async for chat in self.client.iter_chats(page_size=100):
            if chat.chat_id == chat_id:
                self.model = chat.model
                break
        await self.history()

    async def list_models(self) -> None:
        """Print the served models, the default first, marking the current chat's (or next chat's)."""
        reply = await self.client.list_models()
        current = self.model or reply.default_model
        for model in reply.models:
            marker = "*" if model.name == current else " "
            default = "  (default)" if model.name == reply.default_model else ""
            print(f"{marker} {model.name}  context {model.context_length} tokens{default}")

    async def use_model(self, name: str) -> None:
        """Switch the open chat to model `name`, or choose it for the next new chat."""
        if not name:
            await self.list_models()
            return
        if self.chat_id is None:
            served = [model.name for model in (await self.client.list_models()).models]
            if name not in served:
                print(f"model {name!r} is not served; served: {', '.join(served)}")
                return
            self.model = name
            print(f"new chats use {name}")
            return
        chat = await self.client.update_chat(self.chat_id, model=name)
        self.model = chat.model
        print(f"this chat now uses {chat.model}")

    async def usage(self) -> None:
        """Print the last week's tokens by day and model, and what is left of each budget."""
        reply = await self.client.usage(7)
        for row in reply.usage:
            print(
                f"{row.day}  {row.model}: {row.prompt_tokens} prompt + {row.completion_tokens} completion"
                f" tokens, {row.cached_tokens} cached, {row.requests} requests"
            )
        if not reply.usage:
            print("no usage in the last 7 days")
        for budget in reply.budgets:
            scope = "you" if budget.scope == account_pb.BUDGET_SCOPE_USER else f"group {budget.subject}"
            period = "today" if budget.period == account_pb.BUDGET_PERIOD_DAY else "this month"
            if budget.limit_tokens:
                left = f"{budget.remaining_tokens} of {budget.limit_tokens} tokens left"
                print(f"{scope}, {period}: {left} (resets {budget.reset_time.ToJsonString()})")
            else:
                print(f"{scope}, {period}: {budget.used_tokens} tokens used, no limit")

    async def delete(self, chat_id: str) -> None:
        await self.client.delete_chat(chat_id)
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
            print(f"new chat: your next message starts it (model: {self.model or 'the default'})")
        elif command == "/list":
            await self.list_chats()
        elif command == "/open":
            await self.open(argument.strip())
        elif command == "/models":
            await self.list_models()
        elif command == "/model":
            await self.use_model(argument.strip())
        elif command == "/usage":
            await self.usage()
        elif command == "/history":
            await self.history()
        elif command == "/delete":
            await self.delete(argument.strip() or (self.chat_id or ""))
        elif command.startswith("/"):
            print(HELP)
        elif line.strip():
            await self.send(line.strip())
        return True


def describe(error: ChatmeshError) -> str:
    """One line for the user: the status name and what the service said."""
    return f"{error.status_code.name}: {error.message}"


async def run_terminal(
    address: str,
    token: str,
    chat_id: str | None,
    message: str | None,
    list_only: bool,
    delete: str | None,
    model: str | None = None,
) -> int:
    """Entry point of `chatmesh chat`. Returns the exit code. `model` is the new chats' model (None:
    the server's default); with `chat_id`, the chat is switched to it first."""
    async with AsyncChatClient(address, token=token) as client:
        session = ChatSession(client, chat_id, model=model or "")
        try:
            if list_only:
                await session.list_chats()
                return 0
            if delete:
                await session.delete(delete)
                return 0
            if model and chat_id:
                await session.use_model(model)
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
                except ChatmeshError as exc:
                    print(f"[{describe(exc)}]")
        except ChatmeshError as exc:
            print(f"error: {describe(exc)}", file=sys.stderr)
            return 1
