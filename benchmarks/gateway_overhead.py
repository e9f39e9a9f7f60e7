"""What the Envoy gateway costs, measured through the real mesh on PostgreSQL.

1. Latency: `ListChats` (a page of 20) over REST through Envoy versus gRPC straight to one replica,
   one call at a time, the series interleaved. gRPC through Envoy is measured too, which isolates the
   hop from the REST/JSON transcoding. Target: <= 1 ms added at p50.
2. Streaming: tokens/s of the same greedy completion streamed as server-sent events through Envoy
   versus gRPC straight to a replica, runs alternating. Target: ratio >= 0.97.
3. Throughput: sustained `GET /chats` through Envoy for a while with `wrk` (HTTP/1.1 keep-alive), at a
   few connection counts, with the CPU each process used, so the bottleneck is visible.
   Target: >= 1,000 req/s at p99 <= 50 ms.
4. Baseline: the same call as gRPC straight at the replicas with `h2load` (no Envoy), to show which part
   of the machine sets the ceiling.

    .venv/bin/python benchmarks/gateway_overhead.py [--iterations 1000] [--stream-runs 5] [--load-seconds 12]

It creates a throw-away PostgreSQL database on 127.0.0.1:5432, starts the inference service, the chat
replicas and Envoy on free ports, and needs `wrk` and `h2load` on PATH for parts 3 and 4
(`apt-get install wrk nghttp2-client`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.client import NO_RETRY, AsyncChatClient, Delta, Finished
from gateway import EnvoyProcess, GatewaySettings, run_envoy
from tests.support.chat import TEST_SECRET, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import LoggedProcess, free_port, run_service
from tests.support.services import COUNTING_SYSTEM_PROMPT
from tests.support.stack import benchmark_chat_env, inference_env

USER = "bench-user"


def at(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    return (
        f"p50 {statistics.median(values):.3f} ms, p90 {at(values, 0.9):.3f} ms, p99 {at(values, 0.99):.3f} ms"
    )


class KeepAliveClient:
    """A bare HTTP/1.1 keep-alive client, so that the REST series measures Envoy, not a Python HTTP
    library (httpx alone costs more than the budget being measured)."""

    def __init__(self, address: str, token: str) -> None:
        self._host, port = address.rsplit(":", 1)
        self._port = int(port)
        self._auth = f"Bearer {token}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        request = f"GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: {self._auth}\r\n\r\n"
        self._writer.write(request.encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next(
            int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
        )
        return int(lines[0].split()[1]), await self._reader.readexactly(length)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()


def chat_client(target: grpc.aio.Channel) -> AsyncChatClient:
    """The SDK as the benchmark's user: no retries and no deadline, so every figure is one plain call."""
    return AsyncChatClient(target, token=token_for(USER), timeout=None, retry=NO_RETRY)


async def seed_chats(client: AsyncChatClient, count: int) -> None:
    for i in range(count):
        await client.create_chat(title=f"chat {i}")


async def latency(envoy: EnvoyProcess, replica: str, iterations: int) -> None:
    print(f"\n1. ListChats(20) latency, {iterations} calls per series, interleaved", flush=True)
    rest = KeepAliveClient(envoy.listen_address, token_for(USER))
    series: dict[str, list[float]] = {"direct gRPC": [], "gRPC via Envoy": [], "REST via Envoy": []}
    async with (
        grpc.aio.insecure_channel(replica) as direct_channel,
        grpc.aio.insecure_channel(envoy.listen_address) as envoy_channel,
    ):
        direct = chat_client(direct_channel)
        proxied = chat_client(envoy_channel)

        async def rest_call() -> None:
            status, body = await rest.get("/chats?page_size=20")
            assert status == 200 and len(json.loads(body)["chats"]) == 20, body[:200]

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "direct gRPC": lambda: direct.list_chats(20),
            "gRPC via Envoy": lambda: proxied.list_chats(20),
            "REST via Envoy": rest_call,
        }
        warmup = 50
        for i in range(iterations + warmup):
            for name, call in calls.items():
                started = time.perf_counter()
                await call()
                if i >= warmup:
                    series[name].append((time.perf_counter() - started) * 1000)
    await rest.close()
    for name, values in series.items():
        print(f"  {name:<15} {summary(values)}")
    base = statistics.median(series["direct gRPC"])
    for name in ("gRPC via Envoy", "REST via Envoy"):
        added = statistics.median(series[name]) - base
        p99_added = at(series[name], 0.99) - at(series["direct gRPC"], 0.99)
        print(f"  added by Envoy ({name}): p50 {added:+.3f} ms, p99 {p99_added:+.3f} ms  (target p50 <= 1)")


@dataclass
class StreamRun:
    completion_tokens: int
    total_s: float
    streaming_s: float  # first delta to last event

    @property
    def tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.streaming_s


def completion_body(max_tokens: int) -> dict[str, object]:
    return {
        "content": "Count to 300.",
        "system_prompt": COUNTING_SYSTEM_PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 7,
    }


async def stream_direct(client: AsyncChatClient, max_tokens: int) -> StreamRun:
    body = completion_body(max_tokens)
    started = time.perf_counter()
    first = None
    tokens = 0
    async for event in client.stream(
        str(body.pop("content")),
        **body,  # type: ignore[arg-type]
    ):
        if isinstance(event, Delta) and first is None:
            first = time.perf_counter()
        elif isinstance(event, Finished):
            tokens = event.usage.completion_tokens
    ended = time.perf_counter()
    assert first is not None and tokens
    return StreamRun(tokens, ended - started, ended - first)


async def stream_rest(envoy: EnvoyProcess, max_tokens: int) -> StreamRun:
    host, port = envoy.listen_address.rsplit(":", 1)
    body = json.dumps(completion_body(max_tokens)).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.perf_counter()
    writer.write(
        (
            f"POST /chat HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token_for(USER)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + body
    )
    first = None
    tokens = 0
    buffer = b""
    # Read as the bytes arrive (chunk framing is ignored: SSE events are found by their `data:` lines).
    while chunk := await reader.read(65536):
        buffer += chunk
        if first is None and b'"delta"' in buffer:
            first = time.perf_counter()
        if match := re.search(rb'"completion_tokens":(\d+)', buffer):
            tokens = int(match.group(1))
    ended = time.perf_counter()
    writer.close()
    assert first is not None and tokens, buffer[-500:]
    return StreamRun(tokens, ended - started, ended - first)


async def streaming(envoy: EnvoyProcess, replica: str, runs: int, max_tokens: int) -> None:
    print(f"\n2. Streamed completion ({max_tokens} tokens, greedy), {runs} alternating runs each", flush=True)
    direct: list[StreamRun] = []
    proxied: list[StreamRun] = []
    async with grpc.aio.insecure_channel(replica) as channel:
        client = chat_client(channel)
        await stream_direct(client, 8)  # warm-up
        for _ in range(runs):
            direct.append(await stream_direct(client, max_tokens))
            proxied.append(await stream_rest(envoy, max_tokens))
    for name, results in (("direct gRPC", direct), ("REST SSE via Envoy", proxied)):
        rates = [r.tokens_per_s for r in results]
        totals = [r.total_s for r in results]
        print(
            f"  {name:<19} {statistics.median(rates):6.1f} tokens/s (runs {min(rates):.1f}-{max(rates):.1f}),"
            f" {results[0].completion_tokens} tokens, whole call median {statistics.median(totals):.2f} s"
        )
    ratio = statistics.median(r.tokens_per_s for r in proxied) / statistics.median(
        r.tokens_per_s for r in direct
    )
    print(f"  ratio Envoy/direct: {ratio:.3f}  (target >= 0.97)")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process (Linux /proc), in seconds; None once it has exited."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_backends(database: str) -> list[int]:
    """Pids of the PostgreSQL backends serving `database` (their process titles name it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title.startswith("postgres:") and f" {database} " in title:
                pids.append(int(entry.name))
    return pids


def children_cpu_seconds() -> float:
    """CPU time of this process's reaped children (the load generators, once they have ended)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run_load(commands: list[list[str]], groups: dict[str, list[int]]) -> list[str]:
    """Run load generators side by side; print the CPU each process group and the generators used
    meanwhile; return the generators' outputs."""
    before = {pid: now for pids in groups.values() for pid in pids if (now := cpu_seconds(pid)) is not None}
    children_before = children_cpu_seconds()
    started = time.monotonic()
    processes = [
        await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        for command in commands
    ]
    outputs = [(await process.communicate())[0].decode() for process in processes]
    elapsed = time.monotonic() - started
    used = {
        name: sum((cpu_seconds(pid) or before.get(pid, 0.0)) - before.get(pid, 0.0) for pid in pids)
        for name, pids in groups.items()
    }
    used["load generator"] = children_cpu_seconds() - children_before
    print(f"  CPU used ({os.cpu_count()} cores, {elapsed:.1f} s wall):")
    for name, seconds in [*used.items(), ("total", sum(used.values()))]:
        print(f"    {name:<26} {seconds:6.2f} s  ({100 * seconds / elapsed:5.1f}% of one core)")
    return outputs


async def throughput(
    envoy: EnvoyProcess,
    replicas: dict[str, LoggedProcess],
    database: str,
    seconds: int,
    connections: int,
) -> None:
    wrk = shutil.which("wrk")
    if wrk is None:
        print("\n3. skipped: `wrk` is not installed (apt-get install wrk)")
        return
    print(f"\n3. Sustained GET /chats through Envoy: wrk, {connections} connections, {seconds} s", flush=True)
    groups = {"envoy": [envoy.process.pid]} | {
        f"replica {address}": [process.pid] for address, process in replicas.items()
    }
    groups["postgres backends"] = postgres_backends(database)
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {token_for(USER)}",
        f"{envoy.base_url}/chats",
    ]
    (output,) = await run_load([command], groups)
    print("  " + output.strip().replace("\n", "\n  "))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if rps and p99:
        p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
        print(
            f"  => {float(rps.group(1)):.0f} req/s, p99 {p99_ms:.1f} ms,"
            f" non-2xx {non_2xx.group(1) if non_2xx else 0}  (target >= 1,000 req/s, p99 <= 50 ms)"
        )


async def direct_baseline(
    replicas: dict[str, LoggedProcess], database: str, seconds: int, connections: int
) -> None:
    """The same load as gRPC straight at the replicas (h2load, no Envoy): the ceiling they set."""
    h2load = shutil.which("h2load")
    if h2load is None:
        print("\n4. skipped: `h2load` is not installed (apt-get install nghttp2-client)")
        return
    print(
        f"\n4. Baseline without Envoy: gRPC ListChats(20) straight at the replicas with h2load,"
        f" {connections} connections in all, {seconds} s",
        flush=True,
    )
    message = pb.ListChatsRequest(page_size=20).SerializeToString()
    per_replica = max(1, connections // len(replicas))
    groups = {f"replica {address}": [process.pid] for address, process in replicas.items()}
    groups["postgres backends"] = postgres_backends(database)
    with tempfile.NamedTemporaryFile(prefix="chatmesh-listchats-", suffix=".bin") as body:
        # gRPC framing: uncompressed flag, big-endian length, message.
        body.write(b"\0" + len(message).to_bytes(4, "big") + message)
        body.flush()
        commands = [
            [
                h2load,
                f"--duration={seconds}",
                f"--clients={per_replica}",
                "--max-concurrent-streams=1",
                f"--data={body.name}",
                "--header=content-type: application/grpc",
                "--header=te: trailers",
                f"--header=authorization: Bearer {token_for(USER)}",
                f"http://{address}/chatmesh.chat.v1.ChatService/ListChats",
            ]
            for address in replicas
        ]
        outputs = await run_load(commands, groups)
    total = 0.0
    for address, output in zip(replicas, outputs, strict=True):
        rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
        codes = re.search(r"status codes: .*", output)
        mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", output)
        print(f"  replica {address}: {rate.group(1) if rate else '?'} req/s,", end=" ")
        print(f"mean {mean.group(1) if mean else '?'}, {codes.group(0) if codes else output[-300:]}")
        total += float(rate.group(1)) if rate else 0.0
    # h2load counts HTTP statuses only; the same call's gRPC status is checked in part 1.
    print(f"  => {total:.0f} req/s from the replicas alone")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=1000, help="calls per latency series")
    parser.add_argument("--stream-runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--load-seconds", type=int, default=12)
    parser.add_argument(
        "--connections", default="8,32", help="comma-separated wrk connection counts, one run each"
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    parser.add_argument("--seed-chats", type=int, default=50)
    args = parser.parse_args()

    inference = f"127.0.0.1:{free_port()}"
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(args.replicas)]
    async with fresh_postgres_database() as url:
        print(f"starting the inference service and {args.replicas} chat replicas...", flush=True)

        def chat_env(address: str, migrate: bool) -> dict[str, str]:
            return benchmark_chat_env(address, url, inference, migrate, log_level="WARNING")

        with run_service(
            "inference_service", inference_env(inference, log_level="WARNING"), inference, timeout=120
        ):
            replicas: dict[str, LoggedProcess] = {}
            with contextlib.ExitStack() as stack:
                for number, address in enumerate(addresses):
                    replicas[address] = stack.enter_context(
                        run_service("chat_service", chat_env(address, number == 0), address, timeout=120)
                    )
                settings = GatewaySettings(
                    listen_host="127.0.0.1",
                    listen_port=free_port(),
                    admin_port=free_port(),
                    chat_addresses=addresses,
                    jwt_secret=TEST_SECRET,
                    # The limiter stays in the path (its cost is part of the gateway's), set out of reach.
                    rate_limit_per_s=1_000_000,
                    rate_limit_burst=1_000_000,
                    concurrency=args.envoy_concurrency,
                )
                with tempfile.TemporaryDirectory(prefix="chatmesh-gateway-bench-") as workdir:
                    async with run_envoy(settings, Path(workdir)) as envoy:
                        print(
                            f"Envoy on {envoy.listen_address} ({args.envoy_concurrency} worker(s));"
                            f" seeding {args.seed_chats} chats...",
                            flush=True,
                        )
                        async with grpc.aio.insecure_channel(addresses[0]) as channel:
                            await seed_chats(chat_client(channel), args.seed_chats)
                        await latency(envoy, addresses[0], args.iterations)
                        await streaming(envoy, addresses[0], args.stream_runs, args.max_tokens)
                        database = url.rsplit("/", 1)[1]
                        counts = [int(c) for c in args.connections.split(",")]
                        for connections in counts:
                            await throughput(envoy, replicas, database, args.load_seconds, connections)
                        await direct_baseline(replicas, database, args.load_seconds, counts[0])


if __name__ == "__main__":
    asyncio.run(main())
