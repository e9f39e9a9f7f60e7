"""What telemetry costs: time to first token and `ListChats` with metrics and tracing on vs off.

Two identical stacks on one throw-away PostgreSQL database (127.0.0.1:5432): an inference service and
a chat service with telemetry off (nothing installed), and the same pair with Prometheus metrics served
and OpenTelemetry tracing exporting over OTLP/gRPC to a real receiver in this process (every span is
sent and received, as with a collector). Calls alternate between the stacks (off, on, on, off, ...),
so both see the same machine:

- TTFT of `ChatService.Complete` on a new chat (the question's first text, over gRPC);
- `ListChats` (20 per page) for a user with 1,000 chats.

Two stacks of the same settings differ by themselves (`--on none`, before the rounds existed: up to
2.8% in TTFT, two llama-server instances of one model not being equally fast), so the measurement runs
in rounds: each round starts two fresh stacks, and telemetry is on in the first started one in even
rounds and in the second in odd ones; an instance's luck then falls on both sides.

Target (issue 11): p50 with telemetry on within 5% of off (and within 0.3 ms on ListChats).

    .venv/bin/python benchmarks/telemetry_overhead.py [--rounds 4] [--runs 30] [--iterations 200] [--on none]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_overhead import QUESTION, USER, first_delta_ms, percentiles, seed

from chat_service.storage.sql import open_sql_store
from chatmesh.client import NO_RETRY, AsyncChatClient, Delta
from tests.support.chat import token_for
from tests.support.databases import fresh_postgres_database
from tests.support.otlp import run_trace_receiver
from tests.support.processes import free_port, run_service
from tests.support.stack import benchmark_chat_env, inference_env


def stack_env(
    url: str, inference: str, chat: str, telemetry: str | None, parts: set[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(inference env, chat env); with `telemetry` (an OTLP endpoint), `parts` (metrics, tracing) on."""
    engine: dict[str, object] = {"log_level": "WARNING"}
    replica: dict[str, object] = {"log_level": "WARNING"}
    if telemetry is not None and "tracing" in parts:
        engine["otlp_endpoint"] = replica["otlp_endpoint"] = telemetry
    if telemetry is not None and "metrics" in parts:
        engine["metrics_address"] = f"127.0.0.1:{free_port()}"
        replica["metrics_address"] = f"127.0.0.1:{free_port()}"
    # The replica does not migrate: the database is migrated once, before the stacks start.
    return inference_env(inference, **engine), benchmark_chat_env(chat, url, inference, False, **replica)


async def measure_round(
    url: str, receiver_address: str, parts: set[str], on_first: bool, runs: int, iterations: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Start two fresh stacks, the first started one with telemetry when `on_first`, and measure
    alternating calls to both: (TTFT per side, ListChats per side) in milliseconds."""
    sides = ("on", "off") if on_first else ("off", "on")
    addresses = {side: (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") for side in sides}
    envs = {
        side: stack_env(url, *addresses[side], receiver_address if side == "on" else None, parts)
        for side in sides
    }
    with (
        run_service("inference_service", envs[sides[0]][0], addresses[sides[0]][0], timeout=120),
        run_service("chat_service", envs[sides[0]][1], addresses[sides[0]][1], timeout=120),
        run_service("inference_service", envs[sides[1]][0], addresses[sides[1]][0], timeout=120),
        run_service("chat_service", envs[sides[1]][1], addresses[sides[1]][1], timeout=120),
    ):
        async with (
            AsyncChatClient(addresses["off"][1], token=token_for(USER), timeout=None, retry=NO_RETRY) as off,
            AsyncChatClient(addresses["on"][1], token=token_for(USER), timeout=None, retry=NO_RETRY) as on,
        ):
            clients = {"off": off, "on": on}
            ttft: dict[str, list[float]] = {"off": [], "on": []}
            for run in range(runs + 3):
                order = ("off", "on") if run % 2 == 0 else ("on", "off")
                for side in order:
                    chat = await clients[side].create_chat()
                    started = time.perf_counter()
                    value = await first_delta_ms(
                        clients[side].stream(QUESTION, chat_id=chat.chat_id, max_tokens=8, temperature=0),
                        started,
                        lambda e: isinstance(e, Delta),
                    )
                    if run >= 3:  # warm-up
                        ttft[side].append(value)
            listing: dict[str, list[float]] = {"off": [], "on": []}
            for i in range(iterations + 20):
                order = ("off", "on") if i % 2 == 0 else ("on", "off")
                for side in order:
                    started = time.perf_counter()
                    await clients[side].list_chats(20)
                    if i >= 20:
                        listing[side].append((time.perf_counter() - started) * 1000)
    return ttft, listing


def paired_median(values: dict[str, list[float]]) -> float:
    """Median of (on - off) over calls made next to each other: slow drifts of the machine cancel out."""
    return statistics.median(on - off for on, off in zip(values["on"], values["off"], strict=True))


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="fresh pairs of stacks, roles swapped each round"
    )
    parser.add_argument("--runs", type=int, default=30, help="TTFT calls per side and round")
    parser.add_argument("--iterations", type=int, default=200, help="ListChats calls per side and round")
    parser.add_argument(
        "--on", default="metrics,tracing", help="what the 'on' stack turns on: metrics, tracing, both or none"
    )
    args = parser.parse_args()
    parts = set(args.on.split(",")) - {"none"}

    ttft: dict[str, list[float]] = {"off": [], "on": []}
    listing: dict[str, list[float]] = {"off": [], "on": []}
    async with fresh_postgres_database() as url, run_trace_receiver() as receiver:
        seeded = False
        for round_ in range(args.rounds):
            on_first = round_ % 2 == 0
            print(
                f"round {round_ + 1}/{args.rounds}: two fresh stacks, telemetry on in the"
                f" {'first' if on_first else 'second'} started; {args.runs} TTFT and {args.iterations}"
                " ListChats calls per side, alternating...",
                flush=True,
            )
            if not seeded:
                async with open_sql_store(url, migrate=True):
                    pass
                await seed(url)
                seeded = True
            round_ttft, round_listing = await measure_round(
                url, receiver.address, parts, on_first, args.runs, args.iterations
            )
            print(
                f"  TTFT paired median {paired_median(round_ttft):+.2f} ms"
                f" (off p50 {statistics.median(round_ttft['off']):.2f} ms);"
                f" ListChats paired median {paired_median(round_listing):+.3f} ms",
                flush=True,
            )
            for side in ("off", "on"):
                ttft[side] += round_ttft[side]
                listing[side] += round_listing[side]
        spans = Counter(f"{span.service} {span.name}" for span in receiver.spans)
    for name, values in (("Complete TTFT", ttft), ("ListChats(20) of 1,000 chats", listing)):
        off_p50, on_p50 = statistics.median(values["off"]), statistics.median(values["on"])
        print(f"{name} ({args.rounds} rounds):")
        print(f"  telemetry off: {percentiles(values['off'])}")
        print(f"  telemetry on:  {percentiles(values['on'])}")
        print(f"  on / off at p50: {on_p50 / off_p50:.3f} ({on_p50 - off_p50:+.2f} ms)")
        paired = paired_median(values)
        print(f"  paired difference, median: {paired:+.2f} ms ({paired / off_p50:+.1%} of off's p50)")
    print(f"on: {args.on}; spans received by the OTLP receiver: {sum(spans.values())}")
    for name, count in spans.most_common(12):
        print(f"  {count:>6}  {name}")
    print("target: on within 5% of off at p50 (ListChats within 0.3 ms)")


if __name__ == "__main__":
    asyncio.run(main())
