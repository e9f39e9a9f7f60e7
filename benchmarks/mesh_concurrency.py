"""Many streams through the whole mesh: REST SSE via Envoy and two chat replicas vs the engine alone.

At each concurrency (1, 4, 8, 16) every stream starts a new chat with its first message (`POST /chat`,
server-sent events) through Envoy, two chat service replicas (PostgreSQL) and the inference service
(llama_server backend); the other side sends the very same prompt (the chat's system prompt and
question, as the chat service renders them) straight to a `llama-server` with the same slots. Greedy,
`--max-tokens` each, all streams started together, the sides alternating `--rounds` times (question i
cached in slot i on both sides first, as in engine_concurrency); aggregate generated tokens/s (median
over rounds; ratio: median of the rounds' ratios) and TTFT p50/p99 (pooled), and the tokens on both sides.

    .venv/bin/python benchmarks/mesh_concurrency.py [--rounds 3] [--max-tokens 64] [--slots 16]

Target (issue 8): the mesh keeps >= 0.9 of the engine's aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_concurrency import (
    CONTEXT,
    HEADER,
    Stream,
    completion_stream,
    in_slots,
    llama_server_alone,
    one_round,
    place_in_slots,
    row,
    served_setup,
)  # a sibling script: this folder is on the path

from gateway import GatewaySettings, run_envoy
from inference_service.prompt import Role, Turn
from tests.support.chat import TEST_SECRET, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import command_line, cpu_seconds, find_processes, free_port, run_service
from tests.support.stack import benchmark_chat_env, inference_env

SYSTEM_PROMPT = "User: Count from 1 to 40.\nAssistant: " + ", ".join(str(i) for i in range(1, 41))


def processes_by_role(alone_port: int) -> dict[str, list[int]]:
    """Pids of every process in the run, by the part it plays (the mesh's llama-server is the one that
    is not `alone_port`'s; PostgreSQL counts all its backends, this benchmark's being the busy ones)."""
    roles: dict[str, list[int]] = defaultdict(list)
    for pid in find_processes(""):
        line = command_line(pid)
        if "llama-server" in line:
            roles["engine alone" if f"--port {alone_port}" in line else "mesh engine"].append(pid)
        elif "-m inference_service" in line:
            roles["inference service"].append(pid)
        elif "-m chat_service" in line:
            roles["chat replicas"].append(pid)
        elif "envoy" in line and "--disable-hot-restart" in line:
            roles["envoy"].append(pid)
        elif line.startswith("postgres"):
            roles["postgresql"].append(pid)
    return roles


def cpu_of(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each role's processes, and by this benchmark (the client)."""
    used = {role: sum(_cpu_or_zero(pid) for pid in pids) for role, pids in roles.items()}
    used["benchmark client"] = time.process_time()
    return used


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0  # exited (a PostgreSQL backend of a closed connection)


def question(index: int) -> str:
    start = 100 + 37 * index
    return f"Count from {start} to {start + 500}."


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--model", default="gemma-3-270m", help="the catalog model both sides serve")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    setup = served_setup(args.model)
    stop = setup.template.stop
    inference = f"127.0.0.1:{free_port()}"
    replicas = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    with tempfile.TemporaryDirectory() as run_dir:
        async with fresh_postgres_database() as url:
            engine_env = inference_env(
                inference,
                models=args.model,
                log_level="WARNING",
                max_concurrent=args.slots,
                max_queue=64,
                context_length=CONTEXT,
                run_dir=run_dir,
            )

            def chat_env(address: str, migrate: bool) -> dict[str, str]:
                return benchmark_chat_env(
                    address,
                    url,
                    inference,
                    migrate,
                    log_level="WARNING",
                    default_history_strategy=None,  # the service's own default
                    # One benchmark user stands for many: the per-user limit would refuse its streams.
                    max_concurrent_completions_per_user=0,
                )

            print(f"starting the mesh ({args.slots} engine slots) and llama-server alone...", flush=True)
            async with llama_server_alone(args.slots, Path(run_dir), setup) as alone:
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
                        rate_limit_per_s=1_000_000,
                        rate_limit_burst=1_000_000,
                    )
                    async with run_envoy(settings, Path(run_dir)) as envoy:
                        prompts = [
                            await alone.prepare(
                                [Turn(Role.SYSTEM, SYSTEM_PROMPT), Turn(Role.USER, question(i))]
                            )
                            for i in range(max(levels))
                        ]
                        headers = {"authorization": f"Bearer {token_for('mesh-bench')}"}
                        async with (
                            httpx.AsyncClient(
                                base_url=alone.base_url, trust_env=False, timeout=None
                            ) as engine,
                            httpx.AsyncClient(
                                base_url=f"http://{envoy.listen_address}", trust_env=False, timeout=None
                            ) as mesh,
                        ):
                            started: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)

                            async def direct(i: int, t0: float) -> tuple[float, float, int]:
                                return await completion_stream(
                                    engine, prompts[i], args.max_tokens, t0, stop=stop
                                )

                            async def through_mesh(i: int, t0: float) -> tuple[float, float, int]:
                                body = {
                                    "system_prompt": SYSTEM_PROMPT,
                                    "model": args.model,
                                    "content": question(i),
                                    "max_tokens": args.max_tokens,
                                    "temperature": 0,
                                    "history_strategy": "HISTORY_STRATEGY_FULL",
                                }
                                first, tokens = 0.0, 0
                                async with mesh.stream(
                                    "POST", "/chat", json=body, headers=headers
                                ) as response:
                                    response.raise_for_status()
                                    async for line in response.aiter_lines():
                                        if line.startswith("data: "):
                                            event = json.loads(line[6:])
                                            if event.get("delta") and not first:
                                                first = time.perf_counter() - t0
                                                started[i].set()
                                            if "error" in event:
                                                raise RuntimeError(f"mesh stream failed: {event['error']}")
                                            if "usage" in event:
                                                tokens = int(event["usage"].get("completion_tokens", 0))
                                return first, time.perf_counter() - t0, tokens

                            # Warm-up: question i cached in slot i on both sides, as in engine_concurrency
                            # (where the streams sit decides how fast the engine runs them).
                            direct_side = in_slots(engine, prompts, args.max_tokens, started, stop)
                            for side in (direct_side, through_mesh):
                                await place_in_slots(side, max(levels), started)
                            print(
                                HEADER.replace("llama-server", "engine alone").replace("service", "mesh   ")
                            )
                            roles = processes_by_role(int(alone.base_url.rstrip("/").rpartition(":")[2]))
                            cpu = await sweep(levels, args.rounds, direct, through_mesh, roles)
                            print_cpu(cpu, args.rounds * args.max_tokens)


async def sweep(
    levels: list[int], rounds: int, direct: Stream, through_mesh: Stream, roles: dict[str, list[int]]
) -> dict[int, dict[str, defaultdict[str, float]]]:
    """Print a row per concurrency (the sides alternating `rounds` times); return the CPU seconds each
    role used while each side ran, by concurrency and side."""
    cpu: dict[int, dict[str, defaultdict[str, float]]] = {}
    for streams in levels:
        rows: dict[str, list[tuple[float, list[float], int]]] = {"a": [], "m": []}
        cpu[streams] = {"a": defaultdict(float), "m": defaultdict(float)}
        sides = [("a", direct), ("m", through_mesh)]
        for round_index in range(rounds):
            for name, side in sides if round_index % 2 == 0 else sides[::-1]:
                before = cpu_of(roles)
                rows[name].append(await one_round(streams, side))
                for role, used in cpu_of(roles).items():
                    cpu[streams][name][role] += used - before.get(role, 0.0)
        print(row(streams, rows["a"], rows["m"]), flush=True)
    return cpu


def print_cpu(cpu: dict[int, dict[str, defaultdict[str, float]]], tokens_per_stream: int) -> None:
    """CPU milliseconds per generated token of each process, while each side ran (where the mesh's 2
    cores go: every millisecond the services around the engine use is one the engine waits for)."""
    roles = sorted({role for sides in cpu.values() for side in sides.values() for role in side})
    print("\nCPU ms per generated token while each side ran (a: engine alone, m: mesh)")
    print("streams side | " + " ".join(f"{role:>17}" for role in roles))
    for streams, sides in cpu.items():
        tokens = streams * tokens_per_stream
        for name, used in sides.items():
            cells = " ".join(f"{1000 * used.get(role, 0.0) / tokens:17.2f}" for role in roles)
            print(f"{streams:7} {name:>4} | {cells}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
