"""Inter-token time of concurrent streams: through the chat service vs straight from the inference service.

Target (issue 7): the gap between the slowest stream's inter-token time through the chat service and the
engine's own must not grow from tokenization or history work.

Method. `--users` clients (8) run closed loops of `--rounds` requests each: a client sends its next
request as soon as the previous stream ends, so all of them are in flight all the time. Each client has a
chat whose stored history is far longer than the model's context (`--history-turns` counting turns), so
every chat request makes the chat service load the history and fit the window strategy, and the engine
tokenize it (CountTokens) and the chosen prompt (Generate). The engine serves `max_concurrent`
generations at once (1 by default) and queues the rest, so at any moment one stream generates while the
others' requests are admitted, windowed and tokenized: exactly the work that, done on an event loop,
delays the generating stream's next token. The two sides are measured in turn, in one run:

- direct: each client sends `Generate` to the inference service with the prompt the window strategy
  produces for its chat (computed once before the run), so the engine's work per token is the same;
- chat: each client sends `Complete` to the chat service (window strategy) for its chat.

For every stream the client records the time between consecutive text events (the inter-token gaps; the
first event is excluded: its wait is queueing, not streaming). The slowest stream is the one with the
largest mean gap; its p50 and p99 gaps are reported for both sides, with all streams' pooled p50/p99.
Compare the "chat - direct" line between checkouts (before and after a change): to measure another
checkout's services, run this script from that checkout's directory with PYTHONPATH pointing at it
(the services are started with `python -m` from the current directory).

On a shared or busy machine the streams' gaps are noisy at the level of a few ms, so the script also
measures the mechanism directly, in this process with the real tokenizer: how long the event loop is
stalled (the longest gap between 1 ms ticks of a probe task) while a chat's history is tokenized, once
on the loop (what `prepare` did before) and once through the backend's `prepare` (its tokenizer thread).

    .venv/bin/python benchmarks/concurrent_streams.py [--users 8] [--rounds 2] [--max-tokens 32]

It creates a throw-away PostgreSQL database on 127.0.0.1:5432 and starts its own inference and chat
services on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_service.domain import FinishReason, HistoryStrategy
from chat_service.storage.sql import open_sql_store
from chatmesh.client import NO_RETRY, AsyncChatClient, Delta
from chatmesh.inference.v1 import inference_pb2 as ipb
from chatmesh.inference.v1 import inference_pb2_grpc
from tests.support.chat import token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import free_port, run_service
from tests.support.stack import benchmark_chat_env, inference_env

SYSTEM_PROMPT = "You count numbers, separated by commas."
QUESTION = "Count from 1 to 300."


def counting_turn(turn: int) -> tuple[str, str]:
    """A user question and the assistant's answer; the model continues the pattern for many tokens."""
    start = 1 + (turn * 7) % 50
    return f"Count from {start} to {start + 24}.", ", ".join(str(n) for n in range(start, start + 25))


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def seed_chat(url: str, engine: inference_pb2_grpc.InferenceServiceStub, user: str, turns: int) -> str:
    """A window-strategy chat for `user` with `turns` stored counting turns; returns its id."""
    async with open_sql_store(url, migrate=False) as store:
        chat, _ = await store.create_chat(user, "bench", SYSTEM_PROMPT, HistoryStrategy.WINDOW)
        for turn in range(turns):
            question, answer = counting_turn(turn)
            counted = await engine.CountTokens(
                ipb.CountTokensRequest(messages=[ipb.Message(role=ipb.ROLE_USER, content=question)])
            )
            user_message, _ = await store.add_user_message(
                user, chat.id, question, counted.prompt_tokens, None
            )
            await store.add_assistant_message(
                user, chat.id, user_message.id, answer, 3 * 25, FinishReason.STOP
            )
        return str(chat.id)


async def window_prompt(
    engine: inference_pb2_grpc.InferenceServiceStub, turns: int, max_tokens: int, context: int
) -> list[ipb.Message]:
    """The prompt the window strategy sends for a chat seeded with `turns` turns plus QUESTION: the
    longest suffix of whole turns that fits (found with whole-prompt counts only, so that it works with
    any version of the engine)."""
    history: list[ipb.Message] = []
    for turn in range(turns):
        question, answer = counting_turn(turn)
        history += [
            ipb.Message(role=ipb.ROLE_USER, content=question),
            ipb.Message(role=ipb.ROLE_ASSISTANT, content=answer),
        ]
    system = ipb.Message(role=ipb.ROLE_SYSTEM, content=SYSTEM_PROMPT)
    asked = ipb.Message(role=ipb.ROLE_USER, content=QUESTION)
    kept = 0
    while kept < turns:
        candidate = [system, *history[len(history) - 2 * (kept + 1) :], asked]
        counted = await engine.CountTokens(ipb.CountTokensRequest(messages=candidate))
        if counted.prompt_tokens + max_tokens > context:
            break
        kept += 1
    return [system, *history[len(history) - 2 * kept :], asked] if kept else [system, asked]


async def gaps_of(events: AsyncIterator[object], is_text: Callable[[object], bool]) -> list[float]:
    """Milliseconds between consecutive text events of one stream."""
    arrivals: list[float] = []
    async for event in events:
        if is_text(event):
            arrivals.append(time.perf_counter())
    return [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]


async def run_side(
    users: int,
    rounds: int,
    one_stream: Callable[[int], AsyncIterator[object]],
    is_text: Callable[[object], bool],
) -> list[list[float]]:
    """`users` closed loops of `rounds` streams each; the gaps of every stream."""
    streams: list[list[float]] = []

    async def client(index: int) -> None:
        for _ in range(rounds):
            streams.append(await gaps_of(one_stream(index), is_text))

    await asyncio.gather(*(client(i) for i in range(users)))
    return streams


def summary(streams: list[list[float]]) -> tuple[str, float, float]:
    """A report line, and the slowest stream's p50 and p99 gaps."""
    measured = [s for s in streams if s]
    slowest = max(measured, key=statistics.fmean)
    pooled = [gap for s in measured for gap in s]
    p50, p99 = statistics.median(slowest), pct(slowest, 0.99)
    line = (
        f"slowest stream p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(slowest):.1f} ms"
        f" | all {len(measured)} streams p50 {statistics.median(pooled):.1f} ms,"
        f" p99 {pct(pooled, 0.99):.1f} ms ({len(pooled)} gaps)"
    )
    return line, p50, p99


async def loop_stall_ms(work: Callable[[], Awaitable[object]]) -> float:
    """The longest the event loop went without running a 1 ms ticker while `work` ran."""
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    probe = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    await work()
    done = True
    await probe
    return longest * 1000


async def tokenization_stalls(history_turns: int) -> None:
    """Event-loop stall while a `history_turns`-turn history is tokenized: on the loop vs `prepare`."""
    from llama_cpp import Llama

    from inference_service.backends.llama_cpp import LlamaCppBackend
    from inference_service.backends.tokenizers import LlamaTokenizer, tokenize_prompt
    from inference_service.model_files import bundled_gguf_path
    from inference_service.prompt import Role, Turn
    from inference_service.settings import InferenceSettings

    vocab = Llama(model_path=str(bundled_gguf_path()), vocab_only=True, verbose=False)
    template = InferenceSettings(address="127.0.0.1:1").template()
    turns = [Turn(Role.SYSTEM, SYSTEM_PROMPT)]
    for turn in range(history_turns):
        question, answer = counting_turn(turn)
        turns += [Turn(Role.USER, question), Turn(Role.ASSISTANT, answer)]
    turns.append(Turn(Role.USER, QUESTION))
    backend = LlamaCppBackend([vocab], template, "bench")
    tokenizer = LlamaTokenizer(vocab)
    try:
        tokens = (await backend.prepare(turns)).token_count
        idle: list[float] = []
        on_loop: list[float] = []
        threaded: list[float] = []
        for _ in range(5):
            # The same probe with nothing to do: what the machine's scheduling alone costs.
            idle.append(await loop_stall_ms(lambda: asyncio.sleep(0.03)))

            async def inline() -> None:
                tokenize_prompt(template, turns, tokenizer)

            on_loop.append(await loop_stall_ms(inline))
            threaded.append(await loop_stall_ms(lambda: backend.prepare(turns)))
        print(
            f"  event-loop stall tokenizing a {tokens}-token history (median of 5): on the loop"
            f" {statistics.median(on_loop):.1f} ms, through prepare() {statistics.median(threaded):.1f} ms,"
            f" idle probe {statistics.median(idle):.1f} ms"
        )
    finally:
        await backend.aclose()
        vocab.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024, help="the engine's context length")
    parser.add_argument("--history-turns", type=int, default=120, help="stored turns per chat")
    parser.add_argument("--repeats", type=int, default=1, help="direct/chat pairs, alternating")
    parser.add_argument("--skip-streams", action="store_true", help="only the in-process stall probe")
    args = parser.parse_args()

    print("tokenization and the event loop (in this process, real tokenizer):", flush=True)
    await tokenization_stalls(args.history_turns)
    if args.skip_streams:
        return

    inference = f"127.0.0.1:{free_port()}"
    chat = f"127.0.0.1:{free_port()}"
    async with fresh_postgres_database() as url:
        print("starting the inference and chat services...", flush=True)
        engine_env = inference_env(
            inference, context_length=args.context, max_queue=2 * args.users, log_level="WARNING"
        )
        chat_env = benchmark_chat_env(
            chat, url, inference, default_history_strategy="window", log_level="WARNING"
        )
        with (
            run_service("inference_service", engine_env, inference, timeout=120),
            run_service("chat_service", chat_env, chat, timeout=120),
        ):
            async with grpc.aio.insecure_channel(inference) as ich, grpc.aio.insecure_channel(chat) as cch:
                engine = inference_pb2_grpc.InferenceServiceStub(ich)
                users = [f"bench-{i}" for i in range(args.users)]
                # The Python SDK, one client per user on one channel; no retries, so every stream is one call.
                chats = [
                    AsyncChatClient(cch, token=token_for(user), timeout=None, retry=NO_RETRY)
                    for user in users
                ]
                print(f"seeding {args.users} chats with {args.history_turns} turns each...", flush=True)
                chat_ids = await asyncio.gather(
                    *(seed_chat(url, engine, user, args.history_turns) for user in users)
                )
                prompt = await window_prompt(engine, args.history_turns, args.max_tokens, args.context)
                counted = await engine.CountTokens(ipb.CountTokensRequest(messages=prompt))
                print(
                    f"window prompt: {len(prompt)} of {2 * args.history_turns + 2} messages,"
                    f" {counted.prompt_tokens} tokens; max_tokens {args.max_tokens}",
                    flush=True,
                )
                generate = ipb.GenerateRequest(
                    messages=prompt, sampling=ipb.SamplingParams(max_tokens=args.max_tokens, temperature=0)
                )

                def direct(_: int) -> AsyncIterator[object]:
                    return aiter(engine.Generate(generate))

                def through_chat(index: int) -> AsyncIterator[object]:
                    return aiter(
                        chats[index].stream(
                            QUESTION, chat_id=chat_ids[index], max_tokens=args.max_tokens, temperature=0
                        )
                    )

                # Warm-up: the first generations load caches and pages.
                await run_side(2, 1, direct, lambda e: e.HasField("delta"))  # type: ignore[attr-defined]
                results: dict[str, list[list[float]]] = {"direct": [], "chat": []}
                for repeat in range(args.repeats):
                    print(
                        f"run {repeat + 1}/{args.repeats}: {args.users} clients x {args.rounds} streams,"
                        " direct then through the chat service...",
                        flush=True,
                    )
                    results["direct"] += await run_side(
                        args.users,
                        args.rounds,
                        direct,
                        lambda e: e.HasField("delta"),  # type: ignore[attr-defined]
                    )
                    results["chat"] += await run_side(
                        args.users,
                        args.rounds,
                        through_chat,
                        lambda e: isinstance(e, Delta),
                    )
                direct_line, direct_p50, direct_p99 = summary(results["direct"])
                chat_line, chat_p50, chat_p99 = summary(results["chat"])
                print(f"  inference service: {direct_line}")
                print(f"  chat service:      {chat_line}")
                print(
                    f"  chat - direct, slowest stream: p50 {chat_p50 - direct_p50:+.1f} ms,"
                    f" p99 {chat_p99 - direct_p99:+.1f} ms"
                )


if __name__ == "__main__":
    asyncio.run(main())
