"""Embedding throughput: in-process batch encoding vs the real service under many single-text clients.

The service micro-batches concurrent Embed calls, so N clients sending one text each should get close to
what the model does when handed whole batches in-process. This measures both on the same texts:

- in-process: `SentenceTransformer.encode` over the texts in chunks of the service's `max_batch_size`
  (the headline), and of `--reference-batch-sizes` (short texts pad less in small batches, so these can
  be faster; the service is also compared with the fastest of them);
- service: `--clients` concurrent grpc.aio clients, each sending one text per Embed call, until all texts
  are embedded (a closed loop: a client sends its next text as soon as its previous answer arrives).
  The clients run on the same machine, so their CPU use counts against the service.

Rounds alternate (in-process, service, in-process, ...) and the best round of each counts, so a burst of
unrelated load on the machine does not decide the ratio. The target is service / in-process >= 0.8.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embedding_throughput.py            # starts its own service
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embedding_throughput.py --address 127.0.0.1:50053
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatmesh.common.settings import env_for
from chatmesh.embedding.v1 import embedding_pb2 as pb
from chatmesh.embedding.v1 import embedding_pb2_grpc
from embedding_service.settings import EmbeddingSettings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "bench-data" / "qqp_duplicate_pairs.json"

Matrix = npt.NDArray[np.float32]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", help="benchmark a running service instead of starting one")
    parser.add_argument("--texts", type=int, default=1024, help="how many texts to embed per round")
    parser.add_argument("--clients", type=int, default=32, help="concurrent single-text clients")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels the clients share")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement; the best counts")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="in-process batch = service max_batch_size"
    )
    parser.add_argument(
        "--reference-batch-sizes",
        type=lambda value: [int(v) for v in value.split(",") if v],
        default=[16, 32],
        help="further in-process batch sizes to measure, comma-separated (for reference)",
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="service max_wait_ms (own service only)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process and in the service")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="JSON list of {origin, similar} pairs"
    )
    return parser.parse_args(argv)


def load_texts(path: Path, count: int) -> list[str]:
    """`count` distinct real questions (the `origin` side of the pairs, then the `similar` side)."""
    pairs = json.loads(path.read_text())
    texts = list(dict.fromkeys(itertools.chain((p["origin"] for p in pairs), (p["similar"] for p in pairs))))
    if len(texts) < count:
        raise SystemExit(f"{path} holds only {len(texts)} distinct texts; asked for {count}")
    return texts[:count]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def is_serving(address: str) -> bool:
    """One blocking gRPC health check."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@contextmanager
def embedding_service(args: argparse.Namespace) -> Iterator[str]:
    """Start `python -m embedding_service` on a free port; yield its address; SIGTERM it at the end."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        **env_for(
            EmbeddingSettings,
            address=address,
            threads=args.threads,
            max_batch_size=args.batch_size,
            max_wait_ms=args.max_wait_ms,
            log_format="text",
            # Embedding alone; a vector index in the repository's .run/ would clash with a running mesh's.
            vectors_enabled=False,
        ),
    }
    with tempfile.NamedTemporaryFile(prefix="embedding-bench-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "embedding_service"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    log_path = Path(log.name)
    try:
        deadline = time.monotonic() + 120
        while not is_serving(address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"embedding service did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        totals = [line for line in log_path.read_text().splitlines() if "batcher totals" in line]
        print(f"service exited with code {code}; {totals[-1] if totals else 'no batcher totals logged'}")
        log_path.unlink(missing_ok=True)


def measure_in_process(model: SentenceTransformer, texts: list[str], batch_size: int) -> tuple[float, Matrix]:
    """Seconds to encode `texts` in chunks of `batch_size`, and the vectors."""
    encode = model.encode
    started = time.perf_counter()
    chunks = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        chunks.append(
            encode(chunk, batch_size=len(chunk), normalize_embeddings=True, show_progress_bar=False)
        )
        done = i + len(chunk)
        if done % 256 == 0 or done == len(texts):
            print(
                f"  in-process: {done}/{len(texts)} texts, {time.perf_counter() - started:.1f} s", flush=True
            )
    return time.perf_counter() - started, np.concatenate(chunks).astype(np.float32)


async def measure_service(
    address: str, texts: list[str], clients: int, channels: int
) -> tuple[float, Matrix]:
    """Seconds for `clients` concurrent single-text clients to embed all `texts`, and the vectors."""
    opened = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stubs = [embedding_pb2_grpc.EmbeddingServiceStub(channel) for channel in opened]
    vectors: list[list[float]] = [[] for _ in texts]
    next_index = itertools.count()
    done = 0

    async def client(stub: embedding_pb2_grpc.EmbeddingServiceStub) -> None:
        nonlocal done
        while (i := next(next_index)) < len(texts):
            reply = await stub.Embed(pb.EmbedRequest(texts=[texts[i]]), timeout=60)
            vectors[i] = list(reply.embeddings[0].values)
            done += 1
            if done % 256 == 0:
                print(
                    f"  service:    {done}/{len(texts)} texts, {time.perf_counter() - started:.1f} s",
                    flush=True,
                )

    try:
        # Warm-up: connections, server-side handler paths, a few batches.
        warm = [
            stubs[i % channels].Embed(pb.EmbedRequest(texts=[t])) for i, t in enumerate(texts[: clients * 2])
        ]
        await asyncio.gather(*warm)
        started = time.perf_counter()
        await asyncio.gather(*(client(stubs[i % channels]) for i in range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        for channel in opened:
            await channel.close()
    return elapsed, np.asarray(vectors, dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print both throughputs and their ratio."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from embedding_service.encoder import load_sentence_transformer, resolve_model_path

    texts = load_texts(args.data, args.texts)
    print(
        f"{len(texts)} texts (mean {sum(map(len, texts)) / len(texts):.0f} chars); batch {args.batch_size}; "
        f"{args.clients} clients on {args.channels} channels; torch threads {args.threads}; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    model = load_sentence_transformer(resolve_model_path(None), args.threads)
    model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    print(f"in-process torch threads: {torch.get_num_threads()}")

    # The headline compares with batches of max_batch_size; smaller in-process batches are measured too,
    # because with short texts they can be faster (less padding), and the service is only as good as
    # the best of them.
    local_sizes = list(dict.fromkeys([args.batch_size, *args.reference_batch_sizes]))
    local_best = dict.fromkeys(local_sizes, float("inf"))
    remote_best = float("inf")
    local_vectors = remote_vectors = np.empty((0, 0), dtype=np.float32)
    with embedding_service(args) if args.address is None else _given(args.address) as address:
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}/{args.rounds}", flush=True)
            for size in local_sizes:
                seconds, vectors = measure_in_process(model, texts, size)
                local_best[size] = min(local_best[size], seconds)
                print(f"  in-process, batches of {size}: {len(texts) / seconds:.1f} texts/s", flush=True)
                if size == args.batch_size:
                    local_vectors = vectors
            seconds, remote_vectors = asyncio.run(
                measure_service(address, texts, args.clients, args.channels)
            )
            remote_best = min(remote_best, seconds)
            print(f"  service: {len(texts) / seconds:.1f} texts/s", flush=True)

    rate = {size: len(texts) / seconds for size, seconds in local_best.items()}
    remote_rate = len(texts) / remote_best
    fastest = max(rate, key=rate.__getitem__)
    best = f"best of {args.rounds}"
    print("results:")
    for size in local_sizes:
        print(f"  in-process, batches of {size:>3}:    {rate[size]:7.1f} texts/s ({best})")
    print(f"  service, {args.clients} single-text clients: {remote_rate:7.1f} texts/s ({best})")
    headline = remote_rate / rate[args.batch_size]
    print(f"ratio service / in-process (batches of {args.batch_size}): {headline:.2f} (target >= 0.80)")
    print(f"ratio service / fastest in-process (batches of {fastest}): {remote_rate / rate[fastest]:.2f}")
    max_diff = float(np.abs(local_vectors - remote_vectors).max())
    print(f"largest difference between service and in-process vectors: {max_diff:.2e}")


@contextmanager
def _given(address: str) -> Iterator[str]:
    yield address


if __name__ == "__main__":
    main()
