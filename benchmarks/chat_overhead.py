"""Chat service overhead on PostgreSQL, measured through the real services over gRPC.

1. Time to first token (TTFT) of `ChatService.Complete` minus the inference service's own TTFT for the
   same prompt (a fresh chat with the `full` strategy sends exactly [user: question]); the two calls
   alternate in one run. Target: <= 5 ms at p50.
2. `ListChats` (20 per page) for a user with 1,000 chats and `GetMessages` (50 per page) on a
   500-message chat, over gRPC with auth. Target: p50 <= 3 ms each.

    .venv/bin/python benchmarks/chat_overhead.py [--runs 40] [--iterations 300]

It creates a throw-away PostgreSQL database on 127.0.0.1:5432 and starts its own inference and chat
services on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_service.domain import FinishReason, HistoryStrategy
from chat_service.storage.sql import open_sql_store
from chatmesh.chat.v1 import chat_pb2 as cpb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.client import NO_RETRY, AsyncChatClient, Delta
from chatmesh.inference.v1 import inference_pb2 as ipb
from chatmesh.inference.v1 import inference_pb2_grpc
from tests.support.chat import token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import free_port, run_service
from tests.support.stack import benchmark_chat_env, inference_env

QUESTION = "What is the capital of France?"
USER = "bench-user"


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return f"p50 {statistics.median(ordered):.2f} ms, p90 {at(0.9):.2f} ms, p99 {at(0.99):.2f} ms"


async def seed(url: str) -> str:
    """1,000 chats for USER, one of them with 500 messages; returns that chat's id."""
    async with open_sql_store(url, migrate=False) as store:
        print("seeding 1,000 chats and a 500-message chat...", flush=True)
        big = None
        for i in range(1000):
            chat, _ = await store.create_chat(USER, f"chat {i}", "", HistoryStrategy.FULL)
            big = big or chat
        assert big is not None
        for i in range(250):
            user_message, _ = await store.add_user_message(USER, big.id, f"question {i}", 5, None)
            await store.add_assistant_message(
                USER, big.id, user_message.id, f"answer {i}", 5, FinishReason.STOP
            )
        return str(big.id)


async def first_delta_ms(call: AsyncIterator[Any], started: float, is_delta: Callable[[Any], bool]) -> float:
    """Milliseconds from `started` to the first event of `call` that `is_delta`; reads the rest too."""
    async for event in call:
        if is_delta(event):
            ttft = (time.perf_counter() - started) * 1000
            async for _ in call:  # drain, so the run ends as a real client's would
                pass
            return ttft
    raise RuntimeError("stream ended without text")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()

    inference = f"127.0.0.1:{free_port()}"
    chat = f"127.0.0.1:{free_port()}"
    async with fresh_postgres_database() as url:
        print("starting the inference and chat services...", flush=True)
        engine_env = inference_env(inference, log_level="WARNING")
        chat_service_env = benchmark_chat_env(chat, url, inference, log_level="WARNING")
        with (
            run_service("inference_service", engine_env, inference, timeout=120),
            run_service("chat_service", chat_service_env, chat, timeout=120),
        ):
            big_chat = await seed(url)
            async with (
                grpc.aio.insecure_channel(inference) as ich,
                grpc.aio.insecure_channel(chat) as cch,
                # The SDK, as a user of the chat API calls it; no retries and no deadline, so that every
                # figure is one plain call.
                AsyncChatClient(chat, token=token_for(USER), timeout=None, retry=NO_RETRY) as chats,
            ):
                engine = inference_pb2_grpc.InferenceServiceStub(ich)
                # The chat service's own share is measured like the engine's, with the generated stub;
                # what the SDK adds on top of it on the client side is reported apart.
                raw_chat = chat_pb2_grpc.ChatServiceStub(cch)
                metadata = (("authorization", f"Bearer {token_for(USER)}"),)
                generate = ipb.GenerateRequest(
                    messages=[ipb.Message(role=ipb.ROLE_USER, content=QUESTION)],
                    sampling=ipb.SamplingParams(max_tokens=8, temperature=0),
                )
                print(f"TTFT: {args.runs} alternating runs (direct inference vs chat service)...", flush=True)
                direct: list[float] = []
                through_chat: list[float] = []
                through_sdk: list[float] = []
                for run in range(args.runs + 3):
                    started = time.perf_counter()
                    d = await first_delta_ms(
                        engine.Generate(generate), started, lambda e: e.HasField("delta")
                    )
                    new_chat = await chats.create_chat()
                    request = cpb.CompleteRequest(
                        chat_id=new_chat.chat_id, content=QUESTION, max_tokens=8, temperature=0
                    )
                    started = time.perf_counter()
                    c = await first_delta_ms(
                        raw_chat.Complete(request, metadata=metadata), started, lambda e: bool(e.delta)
                    )
                    new_chat = await chats.create_chat()
                    started = time.perf_counter()
                    s = await first_delta_ms(
                        chats.stream(QUESTION, chat_id=new_chat.chat_id, max_tokens=8, temperature=0),
                        started,
                        lambda e: isinstance(e, Delta),
                    )
                    if run >= 3:  # warm-up
                        direct.append(d)
                        through_chat.append(c)
                        through_sdk.append(s)
                added = [c - d for c, d in zip(through_chat, direct, strict=True)]
                print(f"  inference TTFT:    {percentiles(direct)}")
                print(f"  chat service TTFT: {percentiles(through_chat)}")
                print(f"  chat service TTFT with the Python SDK: {percentiles(through_sdk)}")
                print(f"  added by the chat service (paired): {percentiles(added)}  (target p50 <= 5 ms)")
                sdk = [s - c for s, c in zip(through_sdk, through_chat, strict=True)]
                print(f"  added by the SDK over the generated stub (paired): {percentiles(sdk)}")

                print(f"ListChats / GetMessages: {args.iterations} calls each...", flush=True)
                calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                    ("ListChats(20) of 1,000+ chats", lambda: chats.list_chats(20)),
                    ("GetMessages(50) of a 500-message chat", lambda: chats.get_messages(big_chat, 50)),
                ]
                for name, call in calls:
                    timings: list[float] = []
                    for i in range(args.iterations + 20):
                        started = time.perf_counter()
                        await call()
                        if i >= 20:
                            timings.append((time.perf_counter() - started) * 1000)
                    print(f"  {name}: {percentiles(timings)}  (target p50 <= 3 ms)")


if __name__ == "__main__":
    asyncio.run(main())
