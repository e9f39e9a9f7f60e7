"""The engine's own share of fairness: user B's TTFT on llama-server alone, idle and beside A's streams.

benchmarks/fairness.py measures the whole mesh; this takes the mesh away. llama-server is started as the
inference service starts it (the bundled GGUF, 8 slots, the same threads and `--poll 0`), B asks short
questions one after another (8 tokens each, streamed), first on the idle engine, then while A runs
`--streams` long completions (256 tokens, again and again). Printed: B's TTFT p50 and p90 in both phases and
their ratio. If the engine alone is past the 1.5x target of issue 25, no change in the mesh can meet it:
the rest is the engine's compute shared between the streams running at once.

    .venv/bin/python benchmarks/engine_fairness.py [--streams 2] [--questions 20] [--threads N] [--nice N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_service.backends.llama_server import llama_server_binary
from inference_service.model_files import bundled_gguf_path

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is two plus two?",
    "Which planet is closest to the sun?",
    "What do bees make?",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def first_token_s(http: httpx.AsyncClient, question: str) -> float:
    """Seconds from sending `question` to its first text (the reply is read to its end)."""
    body = {
        "prompt": f"User: {question}\nAssistant:",
        "n_predict": 8,
        "stream": True,
        "cache_prompt": True,
        "temperature": 0,
    }
    started = time.perf_counter()
    first = 0.0
    async with http.stream("POST", "/completion", json=body) as response:
        async for line in response.aiter_lines():
            if not first and line.startswith("data: ") and json.loads(line[6:]).get("content"):
                first = time.perf_counter() - started
    if not first:
        raise RuntimeError("the reply had no text")
    return first


async def stream_forever(http: httpx.AsyncClient, number: int) -> None:
    """One of A's streams: a long completion, again and again."""
    while True:
        start = 100 * number
        body = {
            "prompt": f"User: Count from {start} to {start + 500}.\nAssistant:",
            "n_predict": 256,
            "stream": True,
            "temperature": 0,
        }
        async with http.stream("POST", "/completion", json=body) as response:
            async for _ in response.aiter_lines():
                pass


async def ask(http: httpx.AsyncClient, questions: int, phase: str) -> list[float]:
    ttfts = []
    for number in range(questions):
        ttfts.append(await first_token_s(http, QUESTIONS[number % len(QUESTIONS)]))
        print(f"  {phase} {number + 1}/{questions}: TTFT {1000 * ttfts[-1]:.0f} ms", flush=True)
    return ttfts


async def measure(port: int, streams: int, questions: int) -> tuple[list[float], list[float]]:
    """B's TTFTs on the idle engine, then beside A's `streams` streams."""
    # llama-server closes a connection after a streamed reply: no keep-alive.
    limits = httpx.Limits(max_keepalive_connections=0)
    base_url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=None, trust_env=False, limits=limits) as http:
        print("loading the model...", flush=True)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/health")).status_code == 200:
                    break
            await asyncio.sleep(0.2)
        await ask(http, 3, "warm-up")
        idle = await ask(http, questions, "idle")
        tasks = [asyncio.create_task(stream_forever(http, n)) for n in range(streams)]
        try:
            loaded = await ask(http, questions, f"beside {streams} streams")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return idle, loaded


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=2, help="A's concurrent streams")
    parser.add_argument("--questions", type=int, default=20, help="B's questions per phase")
    cores = os.cpu_count() or 1
    parser.add_argument("--threads", type=int, default=max(1, cores - 1), help="llama-server --threads")
    parser.add_argument("--nice", type=int, default=0, help="the engine's nice value")
    args = parser.parse_args()
    port = free_port()
    command = [
        str(llama_server_binary()),
        "--model", str(bundled_gguf_path()),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--parallel", "8",
        "--ctx-size", str(4096 * 8),
        "--cont-batching",
        "--swa-full",
        "--threads", str(args.threads),
        "--threads-batch", str(cores),
        "--no-webui",
        "--poll", "0",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        engine = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None,  # noqa: PLW1509
        )
        try:
            idle, loaded = asyncio.run(measure(port, args.streams, args.questions))
        except BaseException:
            if engine.poll() is not None:
                log.seek(0)
                print(f"llama-server exited: {log.read()[-2000:]!r}", file=sys.stderr)
            raise
        finally:
            engine.terminate()
            engine.wait()
    idle_p50, loaded_p50 = statistics.median(idle), statistics.median(loaded)
    print()
    print(f"{'user B, TTFT on llama-server alone (ms)':<44}{'p50':>8}{'p90':>8}")
    for name, values in (("idle engine", idle), (f"beside {args.streams} streams of A's", loaded)):
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{'  ' + name:<44}{1000 * statistics.median(values):8.0f}{1000 * p90:8.0f}")
    print(f"ratio of p50s: {loaded_p50 / idle_p50:.2f} (issue 25's target for the whole mesh: <= 1.5)")
    one, five, _ = os.getloadavg()
    print(f"load average {one:.2f} {five:.2f} on {cores} cores (the engine shares them with whatever runs)")


if __name__ == "__main__":
    main()
