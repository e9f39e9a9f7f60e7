"""Vector search latency through the real VectorService: one lookup = embed the question + filtered search.

Starts its own embedding service on a fresh local-mode index (qdrant-client's embedded mode, the
default), fills one collection with real questions (Quora Question Pairs from `../shared/bench-data`)
spread over `--users` users, and at each of `--sizes` entries times `--queries` lookups, one at a time,
as the semantic cache makes them: a paraphrase of a stored question, filtered to its user
(`scope == u` and `expires_at > now`), top 1. `scope` is the service's default tenant key, so in local
mode each user's entries are a partition of their own and a lookup scans only those. For reference it
also times `Embed` of the same single texts, the part of a lookup that is not search.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vector_search.py                       # 1k, 10k, 100k
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vector_search.py --sizes 1000,10000
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vector_search.py --address 127.0.0.1:50053 --collection b1

Entries beyond the data's distinct questions reuse questions under other users (many users ask the same
popular questions); the filter keeps every user's lookup to their own entries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatmesh.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from chatmesh.vectors.client import GrpcVectorClient, NewPoint
from chatmesh.vectors.values import Range
from tests.support.processes import free_port, run_service
from tests.support.services import MODEL_STARTUP_TIMEOUT_S
from tests.support.stack import embedding_env

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "bench-data" / "qqp_duplicate_pairs.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", help="benchmark a running embedding service instead of starting one")
    parser.add_argument("--collection", default="bench", help="collection to fill (must be new or empty)")
    parser.add_argument(
        "--sizes",
        type=lambda value: sorted(int(v) for v in value.split(",") if v),
        default=[1_000, 10_000, 100_000],
        help="entry counts to measure at, comma-separated",
    )
    parser.add_argument("--users", type=int, default=100, help="users the entries are spread over")
    parser.add_argument("--queries", type=int, default=200, help="lookups timed at each size")
    parser.add_argument("--batch", type=int, default=32, help="points per Upsert call")
    parser.add_argument("--in-flight", type=int, default=4, help="concurrent Upsert calls while filling")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the service (own service only)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="JSON list of {origin, similar} pairs"
    )
    return parser.parse_args(argv)


@contextmanager
def embedding_service(threads: int) -> Iterator[str]:
    """Start the embedding service with a fresh local index on a free port; SIGTERM it at the end."""
    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="vector-bench-") as index_dir:
        env = embedding_env(
            address,
            Path(index_dir),
            threads=threads,
            # Generous: at 100k entries local mode scans for a good fraction of a second.
            vectors_timeout_s=60,
            log_level="INFO",
        )
        with run_service("embedding_service", env, address, MODEL_STARTUP_TIMEOUT_S) as process:
            yield address
        print(f"service exited with code {process.returncode}")


@contextmanager
def given(address: str) -> Iterator[str]:
    """An address given on the command line, as a context like `embedding_service`."""
    yield address


def load_pairs(path: Path) -> list[tuple[str, str]]:
    """(stored question, paraphrase) pairs with distinct stored questions."""
    pairs = {p["origin"]: p["similar"] for p in json.loads(path.read_text())}
    return list(pairs.items())


def user_of(entry: int, users: int) -> str:
    return f"user-{entry % users}"


def question_of(entry: int, pairs: Sequence[tuple[str, str]]) -> int:
    """The pair whose question entry `entry` stores. Past the last pair the pairs come round again,
    shifted, so that a user never holds the same question twice."""
    return (entry + 7 * (entry // len(pairs))) % len(pairs)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def fill(
    client: GrpcVectorClient,
    args: argparse.Namespace,
    pairs: Sequence[tuple[str, str]],
    start: int,
    end: int,
    expires_at: int,
) -> None:
    """Upsert entries start..end-1, `args.in_flight` calls at a time, printing progress."""
    batches = [range(i, min(i + args.batch, end)) for i in range(start, end, args.batch)]
    queue = iter(batches)
    done = start
    began = time.perf_counter()
    next_report = start

    async def worker() -> None:
        nonlocal done, next_report
        for batch in queue:
            points = [
                NewPoint(
                    uuid.UUID(int=entry + 1),
                    pairs[question_of(entry, pairs)][0],
                    {"scope": user_of(entry, args.users), "expires_at": expires_at, "entry": entry},
                )
                for entry in batch
            ]
            await client.upsert(args.collection, points, timeout_s=300)
            done += len(points)
            if done >= next_report or done == end:
                rate = (done - start) / (time.perf_counter() - began)
                print(f"  filling: {done:,}/{end:,} entries ({rate:.0f}/s)", flush=True)
                next_report = done + max(1_000, (end - start) // 20)

    await asyncio.gather(*(worker() for _ in range(args.in_flight)))


async def lookups(
    client: GrpcVectorClient,
    embed: embedding_pb2_grpc.EmbeddingServiceStub,
    args: argparse.Namespace,
    pairs: Sequence[tuple[str, str]],
    stored: int,
    now: int,
) -> tuple[list[float], list[float], float]:
    """Time `args.queries` lookups (and Embed calls) of paraphrases of stored entries; return both
    latency lists in ms and the share of lookups whose top hit was the paraphrased entry."""
    step = max(1, stored // args.queries)
    entries = list(range(0, stored, step))[: args.queries]
    search_ms: list[float] = []
    embed_ms: list[float] = []
    found = 0
    for entry in entries:
        user = user_of(entry, args.users)
        paraphrase = pairs[question_of(entry, pairs)][1]
        started = time.perf_counter()
        hits = await client.search(
            args.collection,
            paraphrase,
            where={"scope": user, "expires_at": Range(gt=now)},
            limit=1,
            timeout_s=120,
        )
        search_ms.append((time.perf_counter() - started) * 1000)
        assert all(hit.payload["scope"] == user for hit in hits), "a lookup crossed users"
        found += bool(hits) and hits[0].payload["entry"] == entry
        started = time.perf_counter()
        await embed.Embed(embedding_pb2.EmbedRequest(texts=[paraphrase]), timeout=60)
        embed_ms.append((time.perf_counter() - started) * 1000)
    return search_ms, embed_ms, found / len(entries)


async def run(args: argparse.Namespace, address: str) -> list[str]:
    """Fill and measure at every size; the result lines."""
    pairs = load_pairs(args.data)
    now = int(time.time())
    results = []
    async with grpc.aio.insecure_channel(address) as channel:
        client = GrpcVectorClient(channel)
        embed = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        # Warm-up: connection, handlers, the collection's creation.
        await fill(client, args, pairs, 0, min(args.users, args.sizes[0]), now + 86_400)
        await client.search(args.collection, "warm-up", where={"scope": "user-0"}, limit=1)
        stored = min(args.users, args.sizes[0])
        for size in args.sizes:
            print(f"{size:,} entries:", flush=True)
            began = time.perf_counter()
            await fill(client, args, pairs, stored, size, now + 86_400)
            fill_s = time.perf_counter() - began
            stored = size
            search_ms, embed_ms, top1 = await lookups(client, embed, args, pairs, stored, now)
            line = (
                f"{size:>7,} entries: lookup p50 {percentile(search_ms, 50):7.1f} ms  p99 "
                f"{percentile(search_ms, 99):7.1f} ms | Embed alone p50 {statistics.median(embed_ms):5.1f} ms"
                f" | search part p50 ~{statistics.median(search_ms) - statistics.median(embed_ms):6.1f} ms"
                f" | top-1 is the paraphrased entry {top1:.0%} | filled in {fill_s:.0f} s"
            )
            print(line, flush=True)
            results.append(line)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print p50/p99 lookup latency at each size."""
    args = parse_args(argv)
    print(
        f"sizes {args.sizes}; {args.users} users; {args.queries} lookups per size, one at a time, filtered"
        f" to one user, top 1; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with embedding_service(args.threads) if args.address is None else given(args.address) as address:
        results = asyncio.run(run(args, address))
    print("results:")
    for line in results:
        print(f"  {line}")


if __name__ == "__main__":
    main()
