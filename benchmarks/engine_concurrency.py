"""Many streams at once: the inference service (llama_server backend) vs `llama-server` alone.

At each concurrency (1, 2, 4, 8, 16 streams) every stream asks a different question (a few-shot counting
prompt starting at a different number, so that each reply is long and distinct), greedy, `--max-tokens`
tokens; all streams start together. Reported per side: aggregate generated tokens/s (all completion
tokens over the wall time from the first request to the last token), TTFT p50/p99 over the streams,
and the tokens generated, which must be the same on both sides. Both sides run the same portable
`llama-server` build with the same slots (`--slots`, default 16) and context per slot. A warm-up round
at the highest concurrency leaves every question's prompt cached in a slot on both sides, so every
measured round does the same work (a cold round would instead measure which prompts happen to share
llama-server's first batch). The sides alternate at every concurrency, `--rounds` times, taking turns
at going first; the table gives the median rates and the median of the per-round ratios (each round's
pair ran back to back, so a machine that speeds up or slows down between rounds cancels out).

    .venv/bin/python benchmarks/engine_concurrency.py [--rounds 3] [--max-tokens 64] [--slots 16] [--control]
        [--model gemma-3-270m]   # any catalog model (`chatmesh models list`), served the same on both sides

`--control` replaces the service with a second llama-server alone, reached the same way as the first:
the "ratio" column then shows how far two identical engines differ on this machine in this run, the
noise floor that any service/llama-server ratio must be read against.

Targets (issue 8): the service keeps >= 0.95 of llama-server's aggregate tokens/s at every concurrency,
and its TTFT p50 <= 1.25x llama-server's at 8 and 16 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from chatmesh.models.store import ModelStore
from inference_service.backends.base import Prompt
from inference_service.backends.llama_server import LlamaServerBackend, open_llama_server_backend
from inference_service.engines import ModelSetup, model_setup
from inference_service.prompt import Role, Turn
from inference_service.settings import InferenceSettings
from tests.support.processes import free_port, run_service
from tests.support.stack import inference_env

CONTEXT = 1024
EXAMPLE = ", ".join(str(i) for i in range(1, 41))


def served_setup(model: str) -> ModelSetup:
    """The file and prompt template an inference service serving catalog model `model` uses, so the
    engine alone is sent the very prompts the service sends."""
    settings = InferenceSettings(address="127.0.0.1:1", models=model)
    return model_setup(settings.served_models()[0], settings, ModelStore())


def question(index: int) -> list[Turn]:
    start = 100 + 37 * index
    return [
        Turn(Role.USER, "Count from 1 to 40."),
        Turn(Role.ASSISTANT, EXAMPLE),
        Turn(Role.USER, f"Count from {start} to {start + 500}."),
    ]


Stream = Callable[[int, float], Awaitable[tuple[float, float, int]]]
"""Runs stream `i` of a round started at `t0`; returns (first token s, last token s, tokens) after t0."""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


HEADER = (
    f"{'streams':>7} | {'llama-server tok/s':>18} {'TTFT p50':>9} {'p99':>7} |"
    f" {'service tok/s':>13} {'TTFT p50':>9} {'p99':>7} | {'ratio':>5} {'TTFT x':>6} | tokens"
)

Round = tuple[float, list[float], int]


def row(streams: int, alone: list[Round], service: list[Round]) -> str:
    """One line of the table: median aggregate rates over the rounds, the median of the rounds' rate
    ratios, TTFTs pooled over the rounds."""
    a_rate = statistics.median(r[0] for r in alone)
    s_rate = statistics.median(r[0] for r in service)
    ratio = statistics.median(s[0] / a[0] for a, s in zip(alone, service, strict=True))
    a_ttft = [t * 1000 for r in alone for t in r[1]]
    s_ttft = [t * 1000 for r in service for t in r[1]]
    a_p50, s_p50 = statistics.median(a_ttft), statistics.median(s_ttft)
    return (
        f"{streams:>7} | {a_rate:>18.1f} {a_p50:>7.0f}ms {pct(a_ttft, 0.99):>5.0f}ms |"
        f" {s_rate:>13.1f} {s_p50:>7.0f}ms {pct(s_ttft, 0.99):>5.0f}ms |"
        f" {ratio:>5.3f} {s_p50 / a_p50:>6.2f} |"
        f" {sorted({r[2] for r in alone})} / {sorted({r[2] for r in service})}"
    )


def llama_server_alone(
    slots: int, run_dir: Path, setup: ModelSetup
) -> AbstractAsyncContextManager[LlamaServerBackend]:
    """A llama-server of its own (`setup`'s model, `slots` slots of CONTEXT tokens), for the side that
    talks to the engine with nothing in front of it."""
    assert setup.gguf is not None
    return open_llama_server_backend(
        setup.gguf,
        parallel=slots,
        context_length=CONTEXT,
        threads=None,
        batch_threads=None,
        # The prompt the inference service sends (template, preamble), so both sides match.
        template=setup.template,
        model_name=setup.name,
        log_dir=run_dir / "alone",
    )


async def completion_stream(
    http: httpx.AsyncClient,
    prompt: Prompt,
    max_tokens: int,
    t0: float,
    slot: int | None = None,
    on_first: Callable[[], None] = lambda: None,
    stop: tuple[str, ...] = (),
) -> tuple[float, float, int]:
    """One greedy completion straight from llama-server's `/completion` (the relay's own request):
    (first text s, last token s) after t0, and the tokens generated. `slot`: the slot to run in;
    `on_first` is called at the first text; `stop`: the template's stop sequences."""
    body: dict[str, object] = {
        "prompt": list(prompt.token_ids),
        "n_predict": max_tokens,
        "temperature": 0.0,
        "stop": list(stop),
        "stream": True,
        "cache_prompt": True,
    }
    if slot is not None:
        body["id_slot"] = slot
    for attempt in (1, 2):
        try:
            return await _stream_once(http, body, t0, on_first)
        except httpx.RemoteProtocolError:
            # A kept-alive connection closed as it was reused (see LlamaServerBackend._open_stream).
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _stream_once(
    http: httpx.AsyncClient, body: dict[str, object], t0: float, on_first: Callable[[], None]
) -> tuple[float, float, int]:
    first = 0.0
    tokens = 0
    async with http.stream("POST", "/completion", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content", "").strip() and not first:
                first = time.perf_counter() - t0
                on_first()
            if event.get("stop"):
                tokens = int(event.get("tokens_predicted", 0))
    return first, time.perf_counter() - t0, tokens


def in_slots(
    client: httpx.AsyncClient,
    prompts: list[Prompt],
    max_tokens: int,
    started: defaultdict[int, asyncio.Event],
    stop: tuple[str, ...],
) -> Stream:
    """Question i straight to llama-server in slot i (`id_slot`), setting `started[i]` at its first text:
    the direct side's stream for `place_in_slots`; `stop`: the template's stop sequences."""

    async def stream(i: int, t0: float) -> tuple[float, float, int]:
        return await completion_stream(
            client, prompts[i], max_tokens, t0, slot=i, on_first=started[i].set, stop=stop
        )

    return stream


async def place_in_slots(side: Stream, count: int, started: defaultdict[int, asyncio.Event]) -> None:
    """Run questions 0..count-1 on `side`, each started once the previous one streams (`started[i]` is
    set by the side at its first token), so that question i lands in slot i; then forget the events."""
    running = []
    for i in range(count):
        running.append(asyncio.ensure_future(side(i, time.perf_counter())))
        await started[i].wait()
    await asyncio.gather(*running)
    started.clear()


async def one_round(streams: int, run: Stream) -> tuple[float, list[float], int]:
    """(aggregate tokens/s, TTFTs, tokens) of `streams` concurrent streams started together."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(run(i, t0) for i in range(streams)))
    ends = [end for _, end, _ in results]
    tokens = sum(n for _, _, n in results)
    return tokens / max(ends), [first for first, _, _ in results], tokens


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--model", default="gemma-3-270m", help="the catalog model both sides serve")
    parser.add_argument(
        "--control", action="store_true", help="a second llama-server alone in the service's place"
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    setup = served_setup(args.model)
    stop = setup.template.stop
    address = f"127.0.0.1:{free_port()}"
    print(f"starting llama-server alone and the inference service, {args.slots} slots each...", flush=True)
    with tempfile.TemporaryDirectory() as run_dir:
        env = inference_env(
            address,
            backend="llama_server",
            models=args.model,
            max_concurrent=args.slots,
            max_queue=64,
            context_length=CONTEXT,
            log_level="WARNING",
            run_dir=run_dir,
        )
        async with (
            llama_server_alone(args.slots, Path(run_dir), setup) as alone,
            llama_server_alone(args.slots, Path(run_dir) / "control", setup)
            if args.control
            else contextlib.nullcontext() as control,
        ):
            with run_service("inference_service", env, address, timeout=180):
                prompts = [await alone.prepare(question(i)) for i in range(max(levels))]
                async with (
                    grpc.aio.insecure_channel(address) as channel,
                    httpx.AsyncClient(base_url=alone.base_url, trust_env=False, timeout=None) as http,
                    httpx.AsyncClient(
                        base_url=control.base_url if control else alone.base_url,
                        trust_env=False,
                        timeout=None,
                    ) as control_http,
                ):
                    stub = inference_pb2_grpc.InferenceServiceStub(channel)
                    started: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)

                    async def direct(i: int, t0: float) -> tuple[float, float, int]:
                        return await completion_stream(http, prompts[i], args.max_tokens, t0, stop=stop)

                    async def second_engine(i: int, t0: float) -> tuple[float, float, int]:
                        return await completion_stream(
                            control_http, prompts[i], args.max_tokens, t0, stop=stop
                        )

                    async def through_service(i: int, t0: float) -> tuple[float, float, int]:
                        messages = [
                            pb.Message(role=getattr(pb, f"ROLE_{t.role.name}"), content=t.content)
                            for t in question(i)
                        ]
                        request = pb.GenerateRequest(
                            model=args.model,
                            messages=messages,
                            sampling=pb.SamplingParams(max_tokens=args.max_tokens, temperature=0),
                        )
                        first = 0.0
                        tokens = 0
                        async for event in stub.Generate(request):
                            if event.HasField("delta") and not first:
                                first = time.perf_counter() - t0
                                started[i].set()
                            if event.HasField("finished"):
                                tokens = event.finished.usage.completion_tokens
                        return first, time.perf_counter() - t0, tokens

                    service = second_engine if args.control else through_service

                    # Warm-up: page the weights in and cache question i's prompt in slot i on both sides.
                    # Where the prompts sit matters: llama.cpp computes a batch's attention over every
                    # slot from the lowest running one to the highest, so the same streams run much
                    # slower in slots far apart (the SlotChooser docstring has figures). Each side's
                    # question i starts once i-1 is running: the relay's SlotChooser then puts it next
                    # to them, in slot i, and llama-server alone is told to (`id_slot`).
                    second = (
                        in_slots(control_http, prompts, args.max_tokens, started, stop)
                        if args.control
                        else service
                    )
                    for side in (in_slots(http, prompts, args.max_tokens, started, stop), second):
                        await place_in_slots(side, max(levels), started)
                    print(HEADER, flush=True)
                    for streams in levels:
                        rows: dict[str, list[tuple[float, list[float], int]]] = {"alone": [], "service": []}
                        sides = [("alone", direct), ("service", service)]
                        for round_index in range(args.rounds):
                            for name, side in sides if round_index % 2 == 0 else sides[::-1]:
                                rows[name].append(await one_round(streams, side))
                        print(row(streams, rows["alone"], rows["service"]), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
