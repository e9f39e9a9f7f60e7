"""Relay overhead of the inference service: gRPC streaming vs llama.cpp called in-process.

Same model file, same prompt tokens, same sampling (greedy, fixed max_tokens), same run; the two sides
alternate so that thermal or background noise hits both. Reports time to first token (TTFT) and
tokens/s for each side, the p50 TTFT added by the relay, and the tokens/s ratio.

    .venv/bin/python benchmarks/inference_relay.py [--runs 10] [--max-tokens 128]

Targets (issue 2): relay tokens/s >= 0.97 x in-process; added TTFT <= 5 ms at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from inference_service.model_files import bundled_gguf_path
from inference_service.prompt import Role, Turn
from inference_service.settings import InferenceSettings
from tests.support.processes import free_port, run_service
from tests.support.stack import inference_env

EXAMPLE = ", ".join(str(i) for i in range(1, 101))
TURNS = [Turn(Role.USER, "Count to 100."), Turn(Role.ASSISTANT, EXAMPLE), Turn(Role.USER, "Count to 300.")]
CONTEXT = 2048


def in_process_run(llm: object, prompt: str, max_tokens: int, stop: list[str]) -> tuple[float, float, int]:
    """One generation in this process; returns (ttft_s, total_s, completion tokens)."""
    from llama_cpp import StoppingCriteriaList

    generated = 0

    def count(input_ids: object, _logits: object) -> bool:
        nonlocal generated
        # Called before the sampled token joins input_ids, as in the service's own count.
        generated = len(input_ids) - len(token_ids) + 1  # type: ignore[arg-type]
        return False

    started = time.perf_counter()
    # Tokenizing is part of serving a text prompt, in-process as in the service.
    token_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)  # type: ignore[attr-defined]
    ttft = 0.0
    for chunk in llm.create_completion(  # type: ignore[attr-defined]
        token_ids,
        max_tokens=max_tokens,
        temperature=0.0,
        stop=stop,
        stream=True,
        stopping_criteria=StoppingCriteriaList([count]),
    ):
        if chunk["choices"][0]["text"].strip() and not ttft:
            ttft = time.perf_counter() - started
    return ttft, time.perf_counter() - started, generated


async def relay_run(
    stub: inference_pb2_grpc.InferenceServiceStub, max_tokens: int
) -> tuple[float, float, int]:
    """One generation through the service; returns (ttft_s, total_s, completion tokens)."""
    messages = [pb.Message(role=getattr(pb, f"ROLE_{t.role.name}"), content=t.content) for t in TURNS]
    request = pb.GenerateRequest(
        messages=messages, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0)
    )
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async for event in stub.Generate(request):
        if event.HasField("delta") and not ttft:
            ttft = time.perf_counter() - started
        if event.HasField("finished"):
            tokens = event.finished.usage.completion_tokens
    return ttft, time.perf_counter() - started, tokens


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, cores - 1),
        help="generation threads, both sides (service default)",
    )
    parser.add_argument(
        "--batch-threads", type=int, default=cores, help="prompt threads, both sides (service default)"
    )
    args = parser.parse_args()

    from llama_cpp import Llama

    # The prompt the relay's default settings send (preamble included), so both sides match.
    template = InferenceSettings(address="127.0.0.1:1").template()
    threads = args.threads
    print(
        f"loading the model in-process ({threads} generation / {args.batch_threads} prompt threads,"
        f" context {CONTEXT})...",
        flush=True,
    )
    llm = Llama(
        model_path=str(bundled_gguf_path()),
        n_ctx=CONTEXT,
        n_threads=threads,
        n_threads_batch=args.batch_threads,
        verbose=False,
    )
    prompt = template.render(TURNS)

    address = f"127.0.0.1:{free_port()}"
    env = inference_env(
        address,
        # The relay over the same in-process engine the other side calls directly.
        backend="llama_cpp",
        context_length=CONTEXT,
        threads=threads,
        batch_threads=args.batch_threads,
        log_level="WARNING",
    )
    print(f"starting the inference service on {address}...", flush=True)
    with run_service("inference_service", env, address, timeout=120):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            # Warm up both paths (page in weights, first-call allocations).
            in_process_run(llm, prompt, 8, list(template.stop))
            await relay_run(stub, 8)
            local: list[tuple[float, float, int]] = []
            relay: list[tuple[float, float, int]] = []
            for run in range(args.runs):
                local.append(in_process_run(llm, prompt, args.max_tokens, list(template.stop)))
                relay.append(await relay_run(stub, args.max_tokens))
                print(
                    f"  run {run + 1}/{args.runs}: in-process ttft {local[-1][0] * 1000:.1f} ms,"
                    f" relay ttft {relay[-1][0] * 1000:.1f} ms",
                    flush=True,
                )
    llm.close()

    def tokens_per_s(runs: list[tuple[float, float, int]]) -> float:
        return sum(tokens for _, _, tokens in runs) / sum(total for _, total, _ in runs)

    local_ttft = [ttft * 1000 for ttft, _, _ in local]
    relay_ttft = [ttft * 1000 for ttft, _, _ in relay]
    added = [r - lo for r, lo in zip(relay_ttft, local_ttft, strict=True)]
    ratio = tokens_per_s(relay) / tokens_per_s(local)
    # Per-pair ratios too: the two sides of a pair ran back to back, so background load mostly cancels.
    paired = [(r[2] / r[1]) / (lo[2] / lo[1]) for r, lo in zip(relay, local, strict=True)]
    print()
    print(f"runs: {args.runs}, max_tokens: {args.max_tokens}, completion tokens per run: {relay[0][2]}")
    print(f"in-process: {tokens_per_s(local):.1f} tokens/s, TTFT p50 {statistics.median(local_ttft):.1f} ms")
    print(f"relay:      {tokens_per_s(relay):.1f} tokens/s, TTFT p50 {statistics.median(relay_ttft):.1f} ms")
    print(
        f"tokens/s ratio relay/in-process: {ratio:.3f} overall,"
        f" {statistics.median(paired):.3f} median of pairs"
    )
    print("  (target >= 0.97)")
    print(
        f"added TTFT p50: {statistics.median(added):.2f} ms, p90: {pct(added, 0.9):.2f} ms"
        " (target p50 <= 5 ms)"
    )


if __name__ == "__main__":
    asyncio.run(main())
