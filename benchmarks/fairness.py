"""Fairness: one user floods the mesh while another asks one question at a time.

The whole mesh as deployed (Envoy with its default per-user rate limit, two chat service replicas on
PostgreSQL with the default per-user limits, the inference service with the llama_server backend and its
default slots and queue). User B asks `--questions` short questions one after another, each a new chat
(`POST /chat`, server-sent events), and B's time to first token is measured: first on the idle mesh, then
while user A floods it with `--flood` concurrent long completions, each retried after the hint of any 429
(the per-user limit's, the engine's or the edge's) until the flood is stopped. A's client runs in a
process of its own, as a different user's client would: relaying A's streams and retries on B's event loop
would delay B's reads and count them as TTFT. B retries a 429 the same way, and its TTFT counts from its
first try. Printed: B's TTFT p50 (and p90) in both phases, their ratio,
and what A got (streams admitted, 429s, most streams A had running at once, the retry hints), with the
machine's load average before and after (the mesh shares the machine's cores with whatever else runs).

    .venv/bin/python benchmarks/fairness.py [--questions 20] [--flood 16] [--flood-tokens 256]
        [--limit 2]   # CHATMESH_CHAT_MAX_CONCURRENT_COMPLETIONS_PER_USER; --limit 0 shows the mesh without

Target (issue 25): B's TTFT p50 while A floods stays within 1.5x of B's TTFT p50 on the idle mesh.
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
from dataclasses import dataclass, field
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


def flood_question(index: int) -> str:
    start = 100 + 37 * index
    return f"Count from {start} to {start + 500}."


@dataclass
class Flood:
    """What user A got."""

    admitted: int = 0
    refused: int = 0
    running: int = 0
    most_running: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    hints_s: list[float] = field(default_factory=list)


async def first_token_s(
    http: httpx.AsyncClient, user: str, question: str, max_tokens: int
) -> tuple[float, int]:
    """Ask `question` in a new chat as `user`, retrying after the hint of any 429; seconds from the first
    request to the first text, and how many times it was refused first."""
    body = {"content": question, "max_tokens": max_tokens, "temperature": 0}
    headers = {"authorization": f"Bearer {token_for(user)}"}
    started = time.perf_counter()
    refused = 0
    while True:
        async with http.stream("POST", "/chat", json=body, headers=headers) as response:
            if response.status_code == 429:
                refused += 1
                await response.aread()
                await asyncio.sleep(int(response.headers.get("retry-after-ms", "1000")) / 1000)
                continue
            if response.status_code != 200:
                raise RuntimeError(
                    f"user B's question failed: {response.status_code} {await response.aread()!r}"
                )
            first = 0.0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"user B's stream failed: {event['error']}")
                    if event.get("delta") and not first:
                        first = time.perf_counter() - started
        if not first:
            raise RuntimeError("user B's reply had no text")
        return first, refused


async def ask_in_turn(http: httpx.AsyncClient, user: str, questions: int, max_tokens: int) -> list[float]:
    """B's questions one after another; their TTFTs (a refused question's counted from its first try)."""
    ttfts = []
    for number in range(questions):
        ttft, refused = await first_token_s(http, user, QUESTIONS[number % len(QUESTIONS)], max_tokens)
        ttfts.append(ttft)
        note = f" (after {refused} refusals with 429)" if refused else ""
        print(f"  question {number + 1}/{questions}: TTFT {1000 * ttft:.0f} ms{note}", flush=True)
    return ttfts


async def flooder(http: httpx.AsyncClient, number: int, max_tokens: int, flood: Flood) -> None:
    """One of A's streams: a long completion, again and again; after a 429, wait as its hint says."""
    headers = {"authorization": f"Bearer {token_for('user-a')}"}
    round_ = 0
    while True:
        round_ += 1
        body = {"content": flood_question(number * 101 + round_), "max_tokens": max_tokens, "temperature": 0}
        async with http.stream("POST", "/chat", json=body, headers=headers) as response:
            if response.status_code == 429:
                flood.refused += 1
                text = (await response.aread()).decode(errors="replace")
                reason = "per-user limit" if "PER_USER" in text else "engine or edge"
                flood.refusals[reason] = flood.refusals.get(reason, 0) + 1
                flood.hints_s.append(int(response.headers.get("retry-after-ms", "1000")) / 1000)
                await asyncio.sleep(flood.hints_s[-1])
                continue
            response.raise_for_status()
            flood.admitted += 1
            flood.running += 1
            flood.most_running = max(flood.most_running, flood.running)
            try:
                async for _ in response.aiter_lines():
                    pass
            finally:
                flood.running -= 1


async def flood_until_stopped(
    base_url: str, streams: int, max_tokens: int, admitted: Event, stop: Event
) -> Flood:
    """User A's flood: `streams` flooders until `stop` is set; `admitted` is set once one has a stream."""
    flood = Flood()
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=None) as http:
        flooders = [asyncio.create_task(flooder(http, i, max_tokens, flood)) for i in range(streams)]
        try:
            while not stop.is_set():
                await asyncio.sleep(0.05)
                if flood.admitted:
                    admitted.set()
                for task in flooders:
                    if task.done():
                        task.result()
        finally:
            for task in flooders:
                task.cancel()
            await asyncio.gather(*flooders, return_exceptions=True)
    return flood


def run_flood(
    base_url: str, streams: int, max_tokens: int, admitted: Event, stop: Event, result: Queue[Flood]
) -> None:
    """The flood in a process of its own: users A and B are different clients, and one event loop
    relaying A's 16 streams and 429 retries would delay B's reads (B's TTFT would measure the client)."""
    result.put(asyncio.run(flood_until_stopped(base_url, streams, max_tokens, admitted, stop)))


async def flooded_phase(
    http: httpx.AsyncClient, base_url: str, args: argparse.Namespace
) -> tuple[list[float], Flood, float]:
    """B's questions while A floods from a process of its own: B's TTFTs, what A got, how long it ran."""
    spawn = multiprocessing.get_context("spawn")
    admitted, stop, result = spawn.Event(), spawn.Event(), spawn.Queue()
    flood_started = time.perf_counter()
    flood_process = spawn.Process(
        target=run_flood, args=(base_url, args.flood, args.flood_tokens, admitted, stop, result)
    )
    flood_process.start()
    try:
        # A's flood has reached the engine (or its process failed: its output says why).
        while not admitted.is_set():
            if not flood_process.is_alive():
                raise RuntimeError(f"user A's flood exited with {flood_process.exitcode}")
            await asyncio.sleep(0.1)
        print(
            f"flooded mesh: user A runs {args.flood} long completions in a loop;"
            f" user B asks {args.questions} questions in turn",
            flush=True,
        )
        flooded = await ask_in_turn(http, "user-b", args.questions, args.answer_tokens)
        flood_s = time.perf_counter() - flood_started
    finally:
        stop.set()
    flood = await asyncio.to_thread(result.get, True, 60)
    flood_process.join()
    return flooded, flood, flood_s


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else values[0]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=20, help="B's questions per phase")
    parser.add_argument("--answer-tokens", type=int, default=8, help="max_tokens of B's answers")
    parser.add_argument("--flood", type=int, default=16, help="A's concurrent completions")
    parser.add_argument("--flood-tokens", type=int, default=256, help="max_tokens of A's completions")
    parser.add_argument(
        "--limit", type=int, default=None, help="per-user completions (default: the setting's)"
    )
    args = parser.parse_args()
    inference = f"127.0.0.1:{free_port()}"
    replicas = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    print(f"before: {load()}", flush=True)
    with tempfile.TemporaryDirectory() as run_dir:
        async with fresh_postgres_database() as url:
            engine_env = inference_env(inference, log_level="WARNING", run_dir=run_dir)

            def chat_env(address: str, migrate: bool) -> dict[str, str]:
                return benchmark_chat_env(
                    address,
                    url,
                    inference,
                    migrate,
                    log_level="WARNING",
                    default_history_strategy=None,  # the service's own default
                    max_concurrent_completions_per_user=args.limit,  # None: the setting's default
                )

            print(
                "starting the mesh (inference service, 2 chat replicas on PostgreSQL, Envoy)...", flush=True
            )
            with contextlib.ExitStack() as stack:
                stack.enter_context(run_service("inference_service", engine_env, inference, timeout=180))
                for number, address in enumerate(replicas):
                    stack.enter_context(
                        run_service("chat_service", chat_env(address, number == 0), address, timeout=120)
                    )
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
                    print("warm-up (2 questions)...", flush=True)
                    await ask_in_turn(http, "user-b", 2, args.answer_tokens)
                    print(f"idle mesh: user B asks {args.questions} questions in turn", flush=True)
                    idle = await ask_in_turn(http, "user-b", args.questions, args.answer_tokens)
                    flooded, flood, flood_s = await flooded_phase(
                        http, f"http://{envoy.listen_address}", args
                    )
    ratio = p50(flooded) / p50(idle)
    print()
    flooding = f"user A flooding ({args.flood} x {args.flood_tokens} tokens)"
    print(f"{'user B, TTFT over ' + str(args.questions) + ' questions (ms)':<50}{'p50':>8}{'p90':>8}")
    print(f"{'  idle mesh':<50}{1000 * p50(idle):8.0f}{1000 * p90(idle):8.0f}")
    print(f"{'  ' + flooding:<50}{1000 * p50(flooded):8.0f}{1000 * p90(flooded):8.0f}")
    print(f"ratio of p50s: {ratio:.2f} (target <= 1.5)")
    print(
        f"user A, {flood_s:.0f} s: {flood.admitted} completions admitted, {flood.refused} refused with 429"
        f" ({', '.join(f'{n} by the {why}' for why, n in sorted(flood.refusals.items())) or 'none'}),"
        f" at most {flood.most_running} running at once;"
        f" retry hints p50 {p50(flood.hints_s or [0.0]):.1f} s"
    )
    print(f"after: {load()}")


if __name__ == "__main__":
    asyncio.run(main())
