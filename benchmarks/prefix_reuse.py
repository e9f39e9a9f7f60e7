"""KV-prefix reuse across turns: 8 chats taking turns round-robin, TTFT of turn 20 vs turn 1.

Each chat (full history strategy, so every turn's prompt is the whole conversation) gets a turn in turn:
chat 1 turn 1, chat 2 turn 1, ..., chat 8 turn 1, chat 1 turn 2, ... up to turn 20, one request at a
time, through the chat service (Python SDK) in front of the inference service on its default backend.
Each reply is `--max-tokens` tokens (greedy), so by turn 20 a prompt is about 1,700 tokens. TTFT is the
client's time from sending the request to the first text.

An engine that keeps one prompt cache loses it at every switch between chats, and every turn re-reads
the whole history: TTFT grows with the conversation. llama-server keeps a cache per slot and puts a
request in the slot whose cached prompt it extends, so with as many slots as chats each turn only reads
what is new. Target (issue 8): TTFT at turn 20 <= 1.5x turn 1 (medians over the 8 chats).

    .venv/bin/python benchmarks/prefix_reuse.py [--chats 8] [--turns 20] [--max-tokens 64]

`--backend llama_cpp` runs the same sweep on the in-process engine (one prompt cache) for comparison.
It creates a throw-away PostgreSQL database on 127.0.0.1:5432 and starts its own services.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.client import NO_RETRY, AsyncChatClient, Delta, Finished
from tests.support.chat import token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import free_port, run_service
from tests.support.stack import benchmark_chat_env, inference_env

TOPICS = ["lighthouses", "volcanoes", "bees", "glaciers", "trains", "deserts", "owls", "bridges"]


async def turn_ttft(client: AsyncChatClient, chat_id: str, text: str, max_tokens: int) -> tuple[float, int]:
    """(TTFT in ms, prompt tokens) of one turn."""
    started = time.perf_counter()
    ttft = 0.0
    prompt_tokens = 0
    async for event in client.stream(text, chat_id=chat_id, max_tokens=max_tokens, temperature=0):
        if isinstance(event, Delta) and not ttft:
            ttft = (time.perf_counter() - started) * 1000
        if isinstance(event, Finished):
            prompt_tokens = event.usage.prompt_tokens
    return ttft, prompt_tokens


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backend", default="llama_server", choices=["llama_server", "llama_cpp"])
    args = parser.parse_args()
    inference = f"127.0.0.1:{free_port()}"
    chat = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as run_dir:
        async with fresh_postgres_database() as url:
            engine_env = inference_env(
                inference,
                backend=args.backend,
                max_concurrent=args.chats if args.backend == "llama_server" else 1,
                run_dir=run_dir,
                log_level="WARNING",
            )
            chat_env = benchmark_chat_env(
                chat, url, inference, log_level="WARNING", default_history_strategy=None
            )
            print(f"starting the services ({args.backend})...", flush=True)
            with (
                run_service("inference_service", engine_env, inference, timeout=180),
                run_service("chat_service", chat_env, chat, timeout=120),
            ):
                async with AsyncChatClient(
                    chat, token=token_for("prefix-bench"), timeout=None, retry=NO_RETRY
                ) as client:
                    chats = [
                        (await client.create_chat(history_strategy=pb.HISTORY_STRATEGY_FULL)).chat_id
                        for _ in range(args.chats)
                    ]
                    by_turn: list[list[float]] = []
                    prompts: list[list[int]] = []
                    for turn in range(1, args.turns + 1):
                        ttfts, sizes = [], []
                        for index, chat_id in enumerate(chats):
                            topic = TOPICS[index % len(TOPICS)]
                            ttft, size = await turn_ttft(
                                client, chat_id, f"Tell me more about {topic}, part {turn}.", args.max_tokens
                            )
                            ttfts.append(ttft)
                            sizes.append(size)
                        by_turn.append(ttfts)
                        prompts.append(sizes)
                        print(
                            f"turn {turn:>2}: TTFT median {statistics.median(ttfts):6.1f} ms,"
                            f" max {max(ttfts):6.1f} ms; prompt tokens median {statistics.median(sizes):.0f}",
                            flush=True,
                        )
                    first, last = statistics.median(by_turn[0]), statistics.median(by_turn[-1])
                    print(
                        f"TTFT turn {args.turns} / turn 1: {last:.1f} / {first:.1f} ms = {last / first:.2f}x"
                        f" ({args.chats} chats round-robin, {args.backend}; target <= 1.5x)"
                    )


if __name__ == "__main__":
    asyncio.run(main())
