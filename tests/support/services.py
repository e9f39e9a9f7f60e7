"""What the tests' services share, and the prompts they send: one copy for every test module.

The services' environments, from typed settings, and the services themselves are `tests.support.stack`'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatmesh.chat.v1 import chat_pb2
from chatmesh.inference.v1 import inference_pb2 as ipb
from chatmesh.inference.v1 import inference_pb2_grpc
from chatmesh.vectors.client import GrpcVectorClient, Where
from tests.support.processes import LoggedProcess, wait_for_log_entry

MODEL_STARTUP_TIMEOUT_S = 90
"""How long a model-loading service may take to report SERVING (a cold page cache on this machine)."""

SHARED_ENGINE_CONTEXT = 1024
"""Context of the session's shared inference service: small, so that the window strategy has to drop
turns after a few long messages."""

SHARED_ENGINE_MAX_TOKENS = 24
"""Default reply length of the shared inference service: short replies keep the suite fast."""

COUNTING_EXAMPLE = ", ".join(str(i) for i in range(1, 101))

COUNTING_SYSTEM_PROMPT = f"User: Count to 100.\nAssistant: {COUNTING_EXAMPLE}"
"""A chat system prompt after which "Count to 300." makes the base model count on for hundreds of
tokens: a long stream to cancel, join or break mid-way."""

PARIS = [ipb.Message(role=ipb.ROLE_USER, content="What is the capital of France?")]
"""An inference prompt with a short, known answer."""

LONG = [
    ipb.Message(role=ipb.ROLE_USER, content="Count to 100."),
    ipb.Message(role=ipb.ROLE_ASSISTANT, content=COUNTING_EXAMPLE),
    ipb.Message(role=ipb.ROLE_USER, content="Count to 300."),
]
"""A few-shot inference prompt that makes the base model count for several hundred tokens (seconds
here): long enough to cancel or overload it mid-generation."""


async def cancel_a_long_generation(
    stub: inference_pb2_grpc.InferenceServiceStub, service: LoggedProcess, request_id: str
) -> dict[str, Any]:
    """Start a generation that would run for hundreds of tokens, cancel it after its third event, and
    wait for the service's log entry for the end of that generation (written as it gives the slot back);
    returns that entry (its `outcome` says how it ended)."""
    call = stub.Generate(
        ipb.GenerateRequest(
            messages=LONG, sampling=ipb.SamplingParams(max_tokens=1000, temperature=0), request_id=request_id
        )
    )
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            break
    call.cancel()
    return await asyncio.to_thread(
        wait_for_log_entry,
        service,
        lambda entry: entry.get("msg") == "generation ended" and entry.get("request_id") == request_id,
        30,
    )


async def cache_entries(vectors: str, collection: str, where: Where) -> int:
    """How many semantic-cache entries in `collection` match `where`, read straight from the vector
    service at `vectors` (up to 100; the tests store a handful)."""
    async with grpc.aio.insecure_channel(vectors) as channel:
        hits = await GrpcVectorClient(channel).search(collection, "question", where=where, limit=100)
    return len(hits)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def chat_health(address: str) -> set[int]:
    """The gRPC health status of the chat service's server and of ChatService at `address`."""
    service = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        replies = await asyncio.gather(
            *(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5) for name in ("", service))
        )
    return {reply.status for reply in replies}
