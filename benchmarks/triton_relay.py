"""The Triton relay at GPU speed: raw tritonclient streaming vs `InferenceService.Generate`, same model.

A real Triton server (pytriton, on the CPU) serves the TensorRT-LLM-shaped test model with its fixed
token source (`tests/support/triton_llama_model.py --engine fixed`): each token is the next word of a
fixed text, produced in no time or paced per stream (`--tokens-per-s`), like a GPU engine. The inference
service runs its `triton` backend against it. Rounds alternate between

- raw: `tritonclient.grpc.aio` `stream_infer`, one stream per generation, as the backend sends it (the
  same prompt token ids, end and pad ids, tokenized here as the service does);
- service: `InferenceService.Generate` over gRPC (the backend, the relay, the servicer),

with the same request (`max_tokens`, greedy), at 1 and 16 concurrent streams. Per stream: time to the
first token of text and tokens/s from it to the last; per round: aggregate tokens/s. And the relay's own
cost, which carries over to other machines: the inference service's CPU time (user + system, from
/proc) over its rounds per token relayed, and so how many tokens/s one core of this CPU can relay.

Targets (issue 13): >= 0.98 of raw tokens/s per stream (at >= 500 tokens/s per stream), TTFT <= +1 ms at
p50, >= 0.98 of raw aggregate tokens/s at 16 streams.

`--engine decoder` serves the torch decoder stand-in instead (a tiny random-weight decoder that computes
every token, on the GPU when CUDA is present): the relay around an engine that needs its device for
each token rather than one that produces words in no time.

    .venv/bin/python benchmarks/triton_relay.py [--rounds 6] [--tokens 256] [--tokens-per-s 0]
        [--engine fixed|decoder]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from tests.support.processes import (
    cpu_seconds,
    free_port,
    run_service,
    start_process,
    stop_process,
    wait_for_line,
)
from tests.support.stack import inference_env

MODEL_SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "support" / "triton_llama_model.py"
PROMPT = "Tell me a story."


@dataclass
class Stream:
    ttft_s: float
    tokens: int
    streaming_s: float  # first token to last

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.streaming_s if self.streaming_s > 0 else float("nan")


@dataclass
class Round:
    streams: list[Stream]
    wall_s: float

    @property
    def aggregate_tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.streams) / self.wall_s


def _tensor(name: str, data: Any, datatype: str) -> Any:
    tensor = triton_grpc.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


@dataclass(frozen=True)
class RawPrompt:
    """The token-id inputs the service sends for PROMPT: its ids, the end and pad ids."""

    ids: list[int]
    end_id: int
    pad_id: int

    @classmethod
    def as_the_service_sends_it(cls) -> RawPrompt:
        """PROMPT tokenized as the service (default settings, bundled model) tokenizes it."""
        from inference_service.backends.tokenizers import open_tokenizer, tokenize_prompt
        from inference_service.backends.triton import end_and_pad_ids
        from inference_service.chat_template import resolve_template
        from inference_service.model_files import bundled_gguf_path
        from inference_service.prompt import Role, Turn
        from inference_service.settings import InferenceSettings

        settings = InferenceSettings(address="127.0.0.1:1")
        gguf = bundled_gguf_path()
        template = resolve_template(settings.prompt_template, settings.template(), gguf)
        tokenizer = open_tokenizer(gguf)
        prompt = tokenize_prompt(template, [Turn(Role.USER, PROMPT)], tokenizer)
        end_id, pad_id = end_and_pad_ids(tokenizer, settings.triton_end_id, gguf)
        return cls(list(prompt.token_ids), end_id, pad_id)


async def raw_stream(client: Any, prompt: RawPrompt, tokens: int) -> Stream:
    """One generation straight from Triton, with the inputs the backend sends for a greedy request."""
    inputs = [
        _tensor("input_ids", np.array([prompt.ids], dtype=np.int32), "INT32"),
        _tensor("input_lengths", np.array([[len(prompt.ids)]], dtype=np.int32), "INT32"),
        _tensor("max_tokens", np.array([[tokens]], dtype=np.int32), "INT32"),
        _tensor("end_id", np.array([[prompt.end_id]], dtype=np.int32), "INT32"),
        _tensor("pad_id", np.array([[prompt.pad_id]], dtype=np.int32), "INT32"),
        _tensor("stream", np.array([[True]], dtype=np.bool_), "BOOL"),
        _tensor("temperature", np.array([[1.0]], dtype=np.float32), "FP32"),
        _tensor("top_p", np.array([[1.0]], dtype=np.float32), "FP32"),
        _tensor("top_k", np.array([[1]], dtype=np.int32), "INT32"),
    ]

    async def single() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": "ensemble", "inputs": inputs, "request_id": uuid.uuid4().hex}

    started = time.perf_counter()
    first = last = 0.0
    count = 0
    async for result, error in client.stream_infer(single()):
        if error is not None:
            raise error
        if result.as_numpy("text_output") is not None:
            last = time.perf_counter()
            if not count:
                first = last
            count += 1
    return Stream(first - started, count, last - first)


async def service_stream(stub: inference_pb2_grpc.InferenceServiceStub, tokens: int) -> Stream:
    """One generation through the inference service. Tokens are counted as the raw side counts them (one
    word of the fixed text each), from the text the client received."""
    request = pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content=PROMPT)],
        sampling=pb.SamplingParams(max_tokens=tokens, temperature=0),
    )
    started = time.perf_counter()
    first = last = 0.0
    text: list[str] = []
    async for event in stub.Generate(request):
        if event.HasField("delta"):
            last = time.perf_counter()
            if not first:
                first = last
            text.append(event.delta.text)
    return Stream(first - started, len("".join(text).split()), last - first)


async def run_round(make: Any, concurrency: int) -> Round:
    started = time.perf_counter()
    streams = await asyncio.gather(*(make() for _ in range(concurrency)))
    return Round(list(streams), time.perf_counter() - started)


def summary(name: str, rounds: list[Round]) -> dict[str, float]:
    streams = [s for r in rounds for s in r.streams]
    ttft = sorted(s.ttft_s * 1000 for s in streams)
    rates = [s.tokens_per_s for s in streams]
    figures = {
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p99_ms": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "tokens_per_s_p50": statistics.median(rates),
        "aggregate": statistics.median(r.aggregate_tokens_per_s for r in rounds),
    }
    print(
        f"  {name:<8} TTFT p50 {figures['ttft_p50_ms']:.2f} ms, p99 {figures['ttft_p99_ms']:.2f} ms;"
        f" per stream {figures['tokens_per_s_p50']:.0f} tokens/s (p50);"
        f" aggregate {figures['aggregate']:.0f} tokens/s; {streams[0].tokens} tokens per stream",
        flush=True,
    )
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side and concurrency")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="engine pace per stream (0: max)")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--engine", choices=("fixed", "decoder"), default="fixed")
    args = parser.parse_args()

    raw_prompt = RawPrompt.as_the_service_sends_it()
    grpc_port = free_port()
    with tempfile.TemporaryDirectory(prefix="triton-relay-") as workdir:
        print(f"starting Triton with the {args.engine} engine...", flush=True)
        triton = start_process(
            [
                sys.executable,
                str(MODEL_SCRIPT),
                f"--grpc-port={grpc_port}",
                f"--http-port={free_port()}",
                f"--metrics-port={free_port()}",
                f"--engine={args.engine}",
                # Token counts in every response, as deploy/triton's ensemble reports TensorRT-LLM's.
                "--report-lengths",
                f"--tokens-per-s={args.tokens_per_s}",
                f"--log-file={Path(workdir) / 'triton.log'}",
            ]
        )
        try:
            wait_for_line(triton, "READY", timeout=90)
            url = f"127.0.0.1:{grpc_port}"
            address = f"127.0.0.1:{free_port()}"
            env = inference_env(
                address,
                backend="triton",
                triton_url=url,
                log_level="WARNING",
                # Admission must not be what limits 16 streams.
                max_concurrent=32,
            )
            with run_service("inference_service", env, address, timeout=120) as service_process:
                client = triton_grpc.InferenceServerClient(url)
                async with grpc.aio.insecure_channel(address) as channel:
                    stub = inference_pb2_grpc.InferenceServiceStub(channel)
                    sides = {
                        "raw": lambda: raw_stream(client, raw_prompt, args.tokens),
                        "service": lambda: service_stream(stub, args.tokens),
                    }
                    for concurrency in (int(c) for c in args.concurrency.split(",")):
                        print(
                            f"{concurrency} stream(s), {args.rounds} alternating rounds per side:", flush=True
                        )
                        for make in sides.values():  # warm-up
                            await run_round(make, concurrency)
                        rounds: dict[str, list[Round]] = {"raw": [], "service": []}
                        relay_cpu_s = 0.0
                        for index in range(args.rounds):
                            order = ("raw", "service") if index % 2 == 0 else ("service", "raw")
                            for side in order:
                                cpu_before = cpu_seconds(service_process.pid)
                                rounds[side].append(await run_round(sides[side], concurrency))
                                if side == "service":
                                    relay_cpu_s += cpu_seconds(service_process.pid) - cpu_before
                        raw = summary("raw", rounds["raw"])
                        service = summary("service", rounds["service"])
                        per_stream = service["tokens_per_s_p50"] / raw["tokens_per_s_p50"]
                        print(
                            f"  service / raw: per-stream tokens/s {per_stream:.3f},"
                            f" aggregate {service['aggregate'] / raw['aggregate']:.3f};"
                            f" TTFT p50 {service['ttft_p50_ms'] - raw['ttft_p50_ms']:+.2f} ms"
                            "  (targets >= 0.98, >= 0.98 at 16 streams, <= +1 ms)",
                            flush=True,
                        )
                        relayed = sum(s.tokens for r in rounds["service"] for s in r.streams)
                        per_token_us = relay_cpu_s / relayed * 1e6
                        print(
                            f"  relay CPU: {per_token_us:.0f} us per token ({relayed} tokens relayed):"
                            f" one core of this CPU relays up to {1e6 / per_token_us:,.0f} tokens/s",
                            flush=True,
                        )
                await client.close()
        finally:
            stop_process(triton, timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
