"""Two models on one machine: does one model's crowd starve the other's users, and what do two engines cost?

The whole mesh (Envoy, two chat replicas on PostgreSQL, one inference service serving `--model-a` and
`--model-b`, each with an engine of its own). Phases, in one run:

1. idle: user B asks `--questions` short questions one after another, each a new chat on model B;
   B's time to first token (TTFT) is measured.
2. A alone: `--flood` users of model A (one stream each, a new long completion as soon as the last ends,
   from a process of their own) for `--window` seconds; the tokens/s model A's engine gives.
3. A and B: the same flood, and user B asks its questions again; B's TTFT, and the tokens/s of both
   engines together over the same window length.

Printed: B's TTFT p50/p90 idle and beside the flood and their ratio (target <= 2), and the tokens/s of the
two engines together under the flood against model A's engine alone under the same flood (target: at most
10% lost). Tokens are counted from each completion's usage, spread evenly over its stream, so completions
that straddle a window's edge count for the part inside it. The semantic cache is skipped (each request
sets skip_cache): every reply is generated.

    .venv/bin/python benchmarks/multi_model.py [--model-a qwen2.5-coder-0.5b-instruct]
        [--model-b smollm2-135m-instruct] [--flood 16] [--flood-tokens 64] [--questions 20] [--window 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import GatewaySettings, run_envoy
from tests.support.chat import TEST_SECRET, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import free_port, run_service
from tests.support.stack import benchmark_chat_env, inference_env

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is two plus two?",
    "Which planet is closest to the sun?",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is the opposite of hot?",
    "Which animal says moo?",
    "What is frozen water called?",
    "How many days are in a week?",
]


@dataclass(frozen=True)
class Stream:
    """One finished completion: when its first and last events arrived, and its completion tokens."""

    model: str
    first_s: float
    end_s: float
    tokens: int


def tokens_in(streams: list[Stream], start_s: float, end_s: float) -> float:
    """Tokens generated within [start_s, end_s]: each stream's tokens spread evenly over its stream."""
    total = 0.0
    for stream in streams:
        span = stream.end_s - stream.first_s
        if span <= 0:
            total += stream.tokens if start_s <= stream.end_s <= end_s else 0
            continue
        overlap = min(end_s, stream.end_s) - max(start_s, stream.first_s)
        if overlap > 0:
            total += stream.tokens * overlap / span
    return total


async def complete(
    http: httpx.AsyncClient, user: str, model: str, content: str, max_tokens: int
) -> tuple[float, Stream]:
    """`content` in a new chat on `model` as `user`, read to its end; (TTFT in seconds from the request,
    the finished stream). A 429 is retried after its hint, TTFT counted from the first try."""
    body = {
        "content": content,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "skip_cache": True,
    }
    headers = {"authorization": f"Bearer {token_for(user)}"}
    started = time.perf_counter()
    while True:
        async with http.stream("POST", "/chat", json=body, headers=headers) as response:
            if response.status_code == 429:
                await response.aread()
                await asyncio.sleep(int(response.headers.get("retry-after-ms", "1000")) / 1000)
                continue
            if response.status_code != 200:
                raise RuntimeError(f"{user} on {model}: {response.status_code} {await response.aread()!r}")
            first = 0.0
            tokens = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"{user} on {model}: the stream failed: {event['error']}")
                if event.get("delta") and not first:
                    first = time.perf_counter()
                if "usage" in event:
                    tokens = int(event["usage"].get("completion_tokens", 0))
            if not first:
                raise RuntimeError(f"{user} on {model}: the reply had no text")
            return first - started, Stream(model, first, time.perf_counter(), tokens)


async def ask_in_turn(
    http: httpx.AsyncClient, model: str, questions: int, max_tokens: int
) -> tuple[list[float], list[Stream]]:
    """User B's questions on `model`, one after another: their TTFTs and streams."""
    ttfts, streams = [], []
    for number in range(questions):
        ttft, stream = await complete(http, "user-b", model, QUESTIONS[number % len(QUESTIONS)], max_tokens)
        ttfts.append(ttft)
        streams.append(stream)
        print(f"  question {number + 1}/{questions}: TTFT {1000 * ttft:.0f} ms", flush=True)
    return ttfts, streams


async def flood_until_stopped(
    base_url: str, model: str, users: int, max_tokens: int, running: Event, stop: Event
) -> list[Stream]:
    """`users` users of `model`, each asking for a long completion again and again until `stop`."""
    streams: list[Stream] = []

    async def one_user(number: int) -> None:
        round_ = 0
        while not stop.is_set():
            round_ += 1
            start = 100 + 37 * (number * 101 + round_)
            _, stream = await complete(
                http, f"user-a{number}", model, f"Count from {start} to {start + 500}.", max_tokens
            )
            streams.append(stream)

    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=None) as http:
        tasks = [asyncio.create_task(one_user(number)) for number in range(users)]
        try:
            while not stop.is_set():
                await asyncio.sleep(0.05)
                if len(streams) >= users:
                    running.set()
                for task in tasks:
                    if task.done():
                        task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return streams


def run_flood(
    base_url: str,
    model: str,
    users: int,
    max_tokens: int,
    running: Event,
    stop: Event,
    result: Queue[list[Stream]],
) -> None:
    """The flood in a process of its own, as other users' clients would be (see benchmarks/fairness.py).
    Times are `time.perf_counter()`, the same clock in every process of this machine."""
    result.put(asyncio.run(flood_until_stopped(base_url, model, users, max_tokens, running, stop)))


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else values[0]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


async def flooded(
    http: httpx.AsyncClient, base_url: str, args: argparse.Namespace
) -> tuple[float, float, float, list[float]]:
    """Phases 2 and 3 under one flood: (model A alone tokens/s, A's and B's together, B's alone in phase
    3, B's TTFTs in phase 3)."""
    spawn = multiprocessing.get_context("spawn")
    running, stop, result = spawn.Event(), spawn.Event(), spawn.Queue()
    process = spawn.Process(
        target=run_flood,
        args=(base_url, args.model_a, args.flood, args.flood_tokens, running, stop, result),
    )
    process.start()
    try:
        while not running.is_set():
            if not process.is_alive():
                raise RuntimeError(f"the flood exited with {process.exitcode}")
            await asyncio.sleep(0.1)
        print(f"model A flooded by {args.flood} users: {args.window:.0f} s with B idle", flush=True)
        alone_start = time.perf_counter()
        await asyncio.sleep(args.window)
        alone_end = both_start = time.perf_counter()
        print(f"model A flooded, user B asks {args.questions} questions on model B", flush=True)
        ttfts, b_streams = await ask_in_turn(http, args.model_b, args.questions, args.answer_tokens)
        # B's questions take less than a window on a fast model: the flood runs on to the window's end.
        await asyncio.sleep(max(0.0, args.window - (time.perf_counter() - both_start)))
        both_end = time.perf_counter()
    finally:
        stop.set()
    a_streams = await asyncio.to_thread(result.get, True, 600)
    process.join()
    a_alone = tokens_in(a_streams, alone_start, alone_end) / (alone_end - alone_start)
    b_both = tokens_in(b_streams, both_start, both_end) / (both_end - both_start)
    a_both = tokens_in(a_streams, both_start, both_end) / (both_end - both_start)
    return a_alone, a_both + b_both, b_both, ttfts


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-a", default="qwen2.5-coder-0.5b-instruct", help="the flooded model")
    parser.add_argument("--model-b", default="smollm2-135m-instruct", help="user B's model")
    parser.add_argument("--flood", type=int, default=16, help="users of model A, one stream each")
    parser.add_argument("--flood-tokens", type=int, default=64, help="max_tokens of A's completions")
    parser.add_argument("--questions", type=int, default=20, help="B's questions per phase")
    parser.add_argument("--answer-tokens", type=int, default=8, help="max_tokens of B's answers")
    parser.add_argument("--window", type=float, default=60.0, help="seconds each flooded phase lasts")
    args = parser.parse_args()
    inference = f"127.0.0.1:{free_port()}"
    replicas = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    print(f"before: {load()}", flush=True)
    with tempfile.TemporaryDirectory() as run_dir:
        async with fresh_postgres_database() as url:
            engine_env = inference_env(
                inference, models=f"{args.model_a},{args.model_b}", log_level="WARNING", run_dir=run_dir
            )
            print(f"starting the mesh: {args.model_a} and {args.model_b}, 2 chat replicas, Envoy", flush=True)
            with contextlib.ExitStack() as stack:
                stack.enter_context(run_service("inference_service", engine_env, inference, timeout=300))
                for number, address in enumerate(replicas):
                    env = benchmark_chat_env(address, url, inference, number == 0, log_level="WARNING")
                    stack.enter_context(run_service("chat_service", env, address, timeout=120))
                settings = GatewaySettings(
                    listen_host="127.0.0.1",
                    listen_port=free_port(),
                    admin_port=free_port(),
                    chat_addresses=replicas,
                    jwt_secret=TEST_SECRET,
                )
                async with (
                    run_envoy(settings, Path(run_dir)) as envoy,
                    httpx.AsyncClient(
                        base_url=f"http://{envoy.listen_address}", trust_env=False, timeout=None
                    ) as http,
                ):
                    print("warm-up (2 questions on each model)...", flush=True)
                    await ask_in_turn(http, args.model_a, 2, args.answer_tokens)
                    await ask_in_turn(http, args.model_b, 2, args.answer_tokens)
                    print(f"idle mesh: user B asks {args.questions} questions on model B", flush=True)
                    idle, _ = await ask_in_turn(http, args.model_b, args.questions, args.answer_tokens)
                    a_alone, together, b_part, busy = await flooded(
                        http, f"http://{envoy.listen_address}", args
                    )
    ratio = p50(busy) / p50(idle)
    print()
    print(f"{'user B on ' + args.model_b + ', TTFT (ms)':<60}{'p50':>8}{'p90':>8}")
    print(f"{'  idle mesh':<60}{1000 * p50(idle):8.0f}{1000 * p90(idle):8.0f}")
    flood = f"  {args.model_a} flooded ({args.flood} users x {args.flood_tokens} tokens)"
    print(f"{flood:<60}{1000 * p50(busy):8.0f}{1000 * p90(busy):8.0f}")
    print(f"ratio of p50s: {ratio:.2f} (target <= 2)")
    print(f"tokens/s under the flood: {args.model_a} alone {a_alone:.1f};")
    print(f"  both engines together {together:.1f} ({args.model_b}: {b_part:.1f})")
    print(f"  together / alone: {together / a_alone:.2f} (target >= 0.90)")
    print(f"after: {load()}")


if __name__ == "__main__":
    asyncio.run(main())
