"""The floor under any Python relay: what one extra grpc.aio hop costs on this machine, with no work in it.

Three processes, as in the Triton relay benchmark: a source server streaming small messages, a relay
server that forwards each message of its upstream call as it arrives (no logic at all), and this client.
Measured: time to the first message straight from the source and through the relay (alternating calls),
back to back and with an idle gap before each call (as a service sees requests arriving now and then:
waking an idle process's threads is part of the hop), and the relay's CPU time per forwarded message at
a paced rate and unpaced. `benchmarks/triton_relay.py`
reports the inference service's figures next to which these are the floor.

    .venv/bin/python benchmarks/grpc_relay_floor.py [--calls 300] [--gap-ms 10] [--messages 2000] [--rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from tests.support.processes import (
    LoggedProcess,
    cpu_seconds,
    free_port,
    start_process,
    stop_process,
    wait_until_serving,
)

SERVICE = "chatmesh.inference.v1.InferenceService"
SCRIPT = str(Path(__file__).resolve())


class Source(inference_pb2_grpc.InferenceServiceServicer):
    """Streams `max_tokens` one-word deltas (1 if unset) at `top_p` messages/s (0: unpaced)."""

    async def Generate(self, request: pb.GenerateRequest, context: object) -> object:  # type: ignore[override]
        count = request.sampling.max_tokens or 1
        rate = request.sampling.top_p
        started = time.perf_counter()
        for index in range(count):
            if rate and (delay := started + index / rate - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            yield pb.GenerateResponse(delta=pb.Delta(text=" word"))
        yield pb.GenerateResponse(finished=pb.Finished())


class Relay(inference_pb2_grpc.InferenceServiceServicer):
    """Forwards its upstream call's messages one by one, as they arrive."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream
        self._stub: inference_pb2_grpc.InferenceServiceStub | None = None

    async def Generate(self, request: pb.GenerateRequest, context: object) -> object:  # type: ignore[override]
        if self._stub is None:  # on the server's event loop
            self._stub = inference_pb2_grpc.InferenceServiceStub(grpc.aio.insecure_channel(self._upstream))
        async for message in self._stub.Generate(request):
            yield message


async def serve(address: str, servicer: inference_pb2_grpc.InferenceServiceServicer) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    checker = health.aio.HealthServicer()
    await checker.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


async def first_message_ms(stub: inference_pb2_grpc.InferenceServiceStub) -> float:
    started = time.perf_counter()
    async for _ in stub.Generate(pb.GenerateRequest()):
        return (time.perf_counter() - started) * 1000
    raise RuntimeError("no message")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=300, help="first-message calls per side")
    parser.add_argument(
        "--gap-ms", type=float, default=10.0, help="idle time before each call (second series)"
    )
    parser.add_argument("--messages", type=int, default=2000, help="messages per streamed call")
    parser.add_argument("--rate", type=float, default=500.0, help="paced messages/s (also run unpaced)")
    args = parser.parse_args()

    source_address, relay_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    processes: list[LoggedProcess] = [
        start_process([sys.executable, SCRIPT, "--serve-source", source_address]),
        start_process([sys.executable, SCRIPT, "--serve-relay", relay_address, source_address]),
    ]
    try:
        for process, address in zip(processes, (source_address, relay_address), strict=True):
            wait_until_serving(process, address, timeout=30, service=SERVICE)
        relay_pid = processes[1].pid
        async with (
            grpc.aio.insecure_channel(source_address) as direct_channel,
            grpc.aio.insecure_channel(relay_address) as relay_channel,
        ):
            direct = inference_pb2_grpc.InferenceServiceStub(direct_channel)
            relayed = inference_pb2_grpc.InferenceServiceStub(relay_channel)
            for _ in range(50):  # warm-up: connections, code paths
                await first_message_ms(direct)
                await first_message_ms(relayed)
            for gap_s in (0.0, args.gap_ms / 1000):
                pairs = []
                for _ in range(args.calls):
                    await asyncio.sleep(gap_s)
                    direct_ms = await first_message_ms(direct)
                    await asyncio.sleep(gap_s)
                    pairs.append((direct_ms, await first_message_ms(relayed)))
                added = statistics.median(b - a for a, b in pairs)
                when = f"after {gap_s * 1000:.0f} ms idle" if gap_s else "back to back"
                print(
                    f"first message, {when}: direct p50 {statistics.median(a for a, _ in pairs):.2f} ms,"
                    f" through the relay p50 {statistics.median(b for _, b in pairs):.2f} ms; paired median"
                    f" added {added:+.2f} ms ({args.calls} calls each)",
                    flush=True,
                )
            for rate in (args.rate, 0.0):
                request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=args.messages, top_p=rate))
                before = cpu_seconds(relay_pid)
                forwarded = sum([1 async for _ in relayed.Generate(request)])
                per_message_us = (cpu_seconds(relay_pid) - before) / forwarded * 1e6
                pace = f"{rate:.0f} messages/s" if rate else "unpaced"
                print(
                    f"relay CPU per message, {pace}: {per_message_us:.0f} us ({forwarded} messages)",
                    flush=True,
                )
    finally:
        for process in processes:
            stop_process(process, timeout=10)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-source"]:
        asyncio.run(serve(sys.argv[2], Source()))
    elif sys.argv[1:2] == ["--serve-relay"]:
        asyncio.run(serve(sys.argv[2], Relay(sys.argv[3])))
    else:
        asyncio.run(main())
