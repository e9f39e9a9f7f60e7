"""Load test of the whole mesh through Envoy on PostgreSQL, with the real model, and a row count after
every run.

Starts a fresh PostgreSQL database, a NATS JetStream server, the inference service (llama_server backend,
`--slots` slots and a queue of as many), two chat replicas and Envoy, then:

1. ListChats: `--workers` clients calling `GET /chats` back to back for `--seconds`: sustained req/s and
   latency p50/p99.
2. Streaming completions: at each concurrency of `--concurrency`, that many `POST /chat` streams at once
   (new chats, greedy, `--max-tokens`): aggregate generated tokens/s and TTFT p50/p99.
3. Overload: `--overload` streams at once, far beyond slots + queue: how many are refused with 429, how
   fast a refusal arrives (p50/p99), and the TTFT of the accepted ones next to the same concurrency
   without overload.
4. Jobs under the same overload: `--overload` submissions to `POST /chat/{id}/jobs` at once: every one
   accepted (202), then the time until the last is answered.

After every run it counts rows in PostgreSQL: every accepted request has exactly its question and one
reply; a refused completion keeps its question and has no reply; every job has one reply.

    .venv/bin/python benchmarks/load_test.py [--seconds 10] [--workers 16] [--concurrency 1,4,8,16]
        [--overload 48] [--slots 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import EnvoyProcess, GatewaySettings, run_envoy
from tests.support.chat import TEST_SECRET, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.nats import run_nats
from tests.support.processes import free_port, run_service
from tests.support.stack import benchmark_chat_env, inference_env

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What is two plus two?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "Name a large mammal.",
    "What colour is the sky?",
    "How many days are in a week?",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 0.5) * 1000:7.1f} ms  p99 {pct(values, 0.99) * 1000:7.1f} ms"


@dataclass
class Outcome:
    """One streamed completion as the client saw it."""

    request_id: str
    status: int
    ttft_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    finished: bool = False


@dataclass
class Ledger:
    """What the client was told, to check the database against."""

    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)


async def stream_completion(client: httpx.AsyncClient, question: str, max_tokens: int) -> Outcome:
    """`POST /chat` with a first message, read to its last event."""
    request_id = f"load-{uuid.uuid4()}"
    body = {"content": question, "max_tokens": max_tokens, "temperature": 0, "request_id": request_id}
    started = time.perf_counter()
    async with client.stream("POST", "/chat", json=body) as response:
        outcome = Outcome(request_id, response.status_code)
        if response.status_code != 200:
            await response.aread()
            outcome.total_s = time.perf_counter() - started
            return outcome
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("delta") and not outcome.ttft_s:
                outcome.ttft_s = time.perf_counter() - started
            if "usage" in event:
                outcome.tokens = int(event["usage"].get("completion_tokens", 0))
                outcome.finished = True
            if "error" in event:
                raise RuntimeError(f"a stream failed after it started: {event['error']}")
    outcome.total_s = time.perf_counter() - started
    return outcome


async def list_chats_load(client: httpx.AsyncClient, workers: int, seconds: float) -> None:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await client.get("/chats", params={"page_size": 20})
            latencies.append(time.perf_counter() - started)
            failures += response.status_code != 200

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    print(
        f"ListChats, {workers} clients, {elapsed:.0f} s: {len(latencies) / elapsed:7.0f} req/s"
        f"  {ms(latencies)}  non-200: {failures}",
        flush=True,
    )


async def burst(client: httpx.AsyncClient, streams: int, max_tokens: int) -> tuple[list[Outcome], float]:
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(stream_completion(client, QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(streams))
    )
    return list(outcomes), time.perf_counter() - started


def record(ledger: Ledger, outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        if outcome.status == 200 and outcome.finished:
            ledger.accepted.append(outcome.request_id)
        elif outcome.status == 429:
            ledger.refused.append(outcome.request_id)
        else:
            raise RuntimeError(f"unexpected outcome {outcome}")


async def streaming_load(
    client: httpx.AsyncClient, levels: list[int], max_tokens: int, ledger: Ledger
) -> dict[int, list[float]]:
    ttfts: dict[int, list[float]] = {}
    print(f"{'streams':>8} {'tokens/s':>9} {'TTFT':>38} {'tokens':>7} {'429s':>5}", flush=True)
    for streams in levels:
        outcomes, elapsed = await burst(client, streams, max_tokens)
        record(ledger, outcomes)
        served = [o for o in outcomes if o.status == 200]
        ttfts[streams] = [o.ttft_s for o in served]
        tokens = sum(o.tokens for o in served)
        print(
            f"{streams:>8} {tokens / elapsed:>9.1f}   TTFT {ms(ttfts[streams])} {tokens:>7}"
            f" {len(outcomes) - len(served):>5}",
            flush=True,
        )
    return ttfts


async def overload(
    client: httpx.AsyncClient, streams: int, max_tokens: int, ledger: Ledger, baseline: list[float]
) -> None:
    outcomes, _ = await burst(client, streams, max_tokens)
    record(ledger, outcomes)
    refused = [o.total_s for o in outcomes if o.status == 429]
    served = [o.ttft_s for o in outcomes if o.status == 200]
    print(
        f"overload, {streams} streams at once: {len(served)} served, {len(refused)} refused with 429\n"
        f"  429 arrived in         {ms(refused)}\n"
        f"  accepted, TTFT         {ms(served)}\n"
        f"  as many, no overload   {ms(baseline)}",
        flush=True,
    )


async def new_chat(client: httpx.AsyncClient) -> str:
    """An empty chat (`POST /chat` without content streams one event: the chat)."""
    async with client.stream("POST", "/chat", json={"title": "job"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return str(json.loads(line[6:])["chat_id"])
    raise RuntimeError("POST /chat sent no event")


async def jobs_under_overload(client: httpx.AsyncClient, jobs: int, max_tokens: int, ledger: Ledger) -> None:
    chats = await asyncio.gather(*(new_chat(client) for _ in range(jobs)))

    async def submit(i: int) -> str:
        body = {"content": QUESTIONS[i % len(QUESTIONS)], "max_tokens": max_tokens, "temperature": 0}
        response = await client.post(f"/chat/{chats[i]}/jobs", json=body)
        if response.status_code != 202:
            raise RuntimeError(f"job submission answered {response.status_code}: {response.text}")
        return str(response.json()["job_id"])

    started = time.perf_counter()
    ids = await asyncio.gather(*(submit(i) for i in range(jobs)))
    accepted_s = time.perf_counter() - started
    ledger.jobs.extend(ids)
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            state = (await client.get(f"/jobs/{job_id}")).json()["state"]
            if state == "JOB_STATE_FAILED":
                raise RuntimeError(f"job {job_id} failed")
            if state == "JOB_STATE_SUCCEEDED":
                pending.discard(job_id)
        await asyncio.sleep(0.25)
    print(
        f"jobs, {jobs} submitted at once: all accepted (202) in {accepted_s * 1000:.0f} ms;"
        f" all answered after {time.perf_counter() - started:.1f} s",
        flush=True,
    )


async def count_rows(dsn: str, ledger: Ledger) -> None:
    """Every accepted completion: one question with its request id and one reply; every refused one: its
    question, no reply; every job: one reply to its question."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            """SELECT q.request_id, COUNT(DISTINCT q.id) AS questions, COUNT(a.id) AS replies
               FROM messages q LEFT JOIN messages a ON a.reply_to = q.id
               WHERE q.role = 'user' AND q.request_id = ANY($1::text[]) GROUP BY q.request_id""",
            ledger.accepted + ledger.refused,
        )
        found = {row["request_id"]: (row["questions"], row["replies"]) for row in rows}
        job_rows = await connection.fetch(
            """SELECT j.id, COUNT(a.id) AS replies FROM jobs j
               LEFT JOIN messages a ON a.reply_to = j.user_message_id
               WHERE j.id = ANY($1::uuid[]) GROUP BY j.id""",
            [uuid.UUID(j) for j in ledger.jobs],
        )
    finally:
        await connection.close()
    bad_accepted = [r for r in ledger.accepted if found.get(r) != (1, 1)]
    bad_refused = [r for r in ledger.refused if found.get(r) not in ((1, 0), None)]
    bad_jobs = [str(r["id"]) for r in job_rows if r["replies"] != 1] + (
        ["missing jobs"] if len(job_rows) != len(ledger.jobs) else []
    )
    print(
        f"rows: {len(ledger.accepted)} accepted completions with exactly 1 question + 1 reply:"
        f" {'yes' if not bad_accepted else bad_accepted[:5]}; {len(ledger.refused)} refused with no"
        f" reply: {'yes' if not bad_refused else bad_refused[:5]}; {len(ledger.jobs)} jobs with exactly"
        f" 1 reply: {'yes' if not bad_jobs else bad_jobs[:5]}",
        flush=True,
    )
    if bad_accepted or bad_refused or bad_jobs:
        raise SystemExit("the row count found lost or doubled messages")


async def with_mesh(args: argparse.Namespace, body: Callable[[EnvoyProcess, str], Awaitable[None]]) -> None:
    inference = f"127.0.0.1:{free_port()}"
    replicas = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    with (
        tempfile.TemporaryDirectory(prefix="chatmesh-load-") as run_dir,
        run_nats(Path(run_dir) / "nats") as nats,
    ):
        async with fresh_postgres_database("chatmesh_load") as url:
            queue = args.queue if args.queue is not None else args.slots
            engine_env = inference_env(
                inference, log_level="WARNING", max_concurrent=args.slots, max_queue=queue, run_dir=run_dir
            )
            print(f"starting the mesh ({args.slots} engine slots + a queue of {queue})...", flush=True)
            with contextlib.ExitStack() as stack:
                stack.enter_context(run_service("inference_service", engine_env, inference, timeout=180))
                for number, address in enumerate(replicas):
                    env = benchmark_chat_env(
                        address,
                        url,
                        inference,
                        number == 0,
                        log_level="WARNING",
                        jobs_nats_url=nats.url,
                        # One benchmark user stands for many: this measures the engine's and the queue's
                        # admission, which the per-user limits would hide.
                        max_concurrent_completions_per_user=0,
                        max_active_jobs_per_user=0,
                    )
                    stack.enter_context(run_service("chat_service", env, address, timeout=120))
                settings = GatewaySettings(
                    listen_host="127.0.0.1",
                    listen_port=free_port(),
                    admin_port=free_port(),
                    chat_addresses=replicas,
                    jwt_secret=TEST_SECRET,
                    rate_limit_per_s=1_000_000,
                    rate_limit_burst=1_000_000,
                    # Admission at the edge: what the engine holds (slots + queue), so an overflow is
                    # refused by Envoy at once instead of costing the replicas and the engine work first.
                    max_active_completions=0 if args.no_edge_cap else args.slots + queue,
                )
                async with run_envoy(settings, Path(run_dir)) as envoy:
                    await body(envoy, url.replace("postgresql+asyncpg://", "postgresql://"))


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--overload", type=int, default=48)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--queue", type=int, default=None, help="engine queue length (default: --slots)")
    parser.add_argument(
        "--no-edge-cap", action="store_true", help="no gateway cap: overflow reaches the engine's admission"
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]

    async def body(envoy: EnvoyProcess, dsn: str) -> None:
        headers = {"authorization": f"Bearer {token_for('load-test')}"}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(
            base_url=f"http://{envoy.listen_address}",
            headers=headers,
            timeout=120,
            limits=limits,
            trust_env=False,
        ) as client:
            ledger = Ledger()
            await burst(client, 2, 4)  # warm-up (not counted)
            await list_chats_load(client, args.workers, args.seconds)
            ttfts = await streaming_load(client, levels, args.max_tokens, ledger)
            await count_rows(dsn, ledger)
            # The accepted ones of an overload are slots + queue streams: compare with that many alone.
            held = args.slots + (args.queue if args.queue is not None else args.slots)
            baseline = ttfts.get(held) or ttfts[max(ttfts)]
            await overload(client, args.overload, args.max_tokens, ledger, baseline)
            await count_rows(dsn, ledger)
            await jobs_under_overload(client, args.overload, args.max_tokens, ledger)
            await count_rows(dsn, ledger)

    await with_mesh(args, body)


if __name__ == "__main__":
    asyncio.run(main())
