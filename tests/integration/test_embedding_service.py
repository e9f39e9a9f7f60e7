"""The real embedding service (all-MiniLM-L6-v2 on CPU) over gRPC: vectors, batching, validation, shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatmesh.embedding.v1 import embedding_pb2 as pb
from chatmesh.embedding.v1 import embedding_pb2_grpc
from tests.support.processes import LoggedProcess, free_port, log_entries, run_service, wait_for_log_entry
from tests.support.services import MODEL_STARTUP_TIMEOUT_S
from tests.support.stack import embedding_env

pytestmark = pytest.mark.integration

SERVICE = "chatmesh.embedding.v1.EmbeddingService"
# A copy of the first pairs of ../shared/bench-data/qqp_duplicate_pairs.json (see tests/data/README.md).
PAIRS_FILE = Path(__file__).resolve().parents[1] / "data" / "qqp_pairs_sample.json"

Vectors = npt.NDArray[np.float32]


@pytest.fixture
async def stub(
    embedding_service: tuple[str, LoggedProcess],
) -> AsyncIterator[embedding_pb2_grpc.EmbeddingServiceStub]:
    async with grpc.aio.insecure_channel(embedding_service[0]) as channel:
        yield embedding_pb2_grpc.EmbeddingServiceStub(channel)


async def embed(stub: embedding_pb2_grpc.EmbeddingServiceStub, texts: Sequence[str]) -> Vectors:
    """Embed `texts` over gRPC; one row per text."""
    reply = await stub.Embed(pb.EmbedRequest(texts=texts), timeout=60)
    assert reply.model == "all-MiniLM-L6-v2"
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)


async def rejected(
    stub: embedding_pb2_grpc.EmbeddingServiceStub, texts: Sequence[str]
) -> grpc.aio.AioRpcError:
    """The error an Embed call with `texts` fails with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest(texts=texts), timeout=30)
    return info.value


async def test_health_and_model_info(
    embedding_service: tuple[str, LoggedProcess], stub: embedding_pb2_grpc.EmbeddingServiceStub
) -> None:
    async with grpc.aio.insecure_channel(embedding_service[0]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (info.model, info.dimension, info.max_texts_per_request, info.max_text_chars) == (
        "all-MiniLM-L6-v2",
        384,
        64,
        8192,
    )


async def test_vectors_have_384_dimensions_and_unit_norm(
    stub: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    vectors = await embed(stub, ["Hello, world!", "What is the capital of France?", "x" * 8192])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


async def test_paraphrases_are_closer_than_unrelated_sentences(
    stub: embedding_pb2_grpc.EmbeddingServiceStub,
) -> None:
    pairs = [(p["origin"], p["similar"]) for p in json.loads(PAIRS_FILE.read_text())[:10]]
    pairs.append(("How do I reset my password?", "I forgot my password, how can I change it?"))
    originals = await embed(stub, [a for a, _ in pairs])
    paraphrases = await embed(stub, [b for _, b in pairs])
    similarity = originals @ paraphrases.T
    for i, (original, paraphrase) in enumerate(pairs):
        unrelated = np.delete(similarity[i], i)
        # Stricter than one unrelated sentence: the paraphrase beats every other pair's sentence.
        assert similarity[i, i] > unrelated.max(), (original, paraphrase, similarity[i, i], unrelated.max())


async def test_result_order_matches_input_order(stub: embedding_pb2_grpc.EmbeddingServiceStub) -> None:
    texts = [
        "The cat sat on the mat.",
        "Quarterly revenue grew by twelve percent.",
        "How do I bake sourdough bread at home?",
        "Photosynthesis converts light into chemical energy.",
        "Which football club has the biggest fan base?",
    ]
    batch = await embed(stub, texts)
    solo = np.concatenate([await embed(stub, [text]) for text in texts])
    np.testing.assert_allclose(batch, solo, atol=1e-5)
    reversed_batch = await embed(stub, texts[::-1])
    np.testing.assert_allclose(reversed_batch[::-1], solo, atol=1e-5)


async def test_concurrent_clients_get_their_own_vectors(
    embedding_service: tuple[str, LoggedProcess], stub: embedding_pb2_grpc.EmbeddingServiceStub
) -> None:
    pairs = json.loads(PAIRS_FILE.read_text())[100:124]
    requests = [[p["origin"]] if i % 3 else [p["origin"], p["similar"]] for i, p in enumerate(pairs)]
    solo = {text: (await embed(stub, [text]))[0] for texts in requests for text in texts}
    results = await asyncio.gather(*(embed(stub, texts) for texts in requests))
    for texts, vectors in zip(requests, results, strict=True):
        assert vectors.shape == (len(texts), 384)
        for text, vector in zip(texts, vectors, strict=True):
            np.testing.assert_allclose(vector, solo[text], atol=1e-5, err_msg=text)
    # The service logs each batch at DEBUG: concurrent calls must have shared forward passes.
    entries = log_entries(embedding_service[1])
    batch_sizes = [entry["requests"] for entry in entries if entry.get("msg") == "batch encoded"]
    assert max(batch_sizes) > 1, f"no batch merged two requests: {batch_sizes}"


@pytest.mark.parametrize(
    ("texts", "field", "problem"),
    [
        ([], "texts", "at least one"),
        (["fine", ""], "texts[1]", "empty"),
        (["fine", "   "], "texts[1]", "empty"),
        (["x" * 8193], "texts[0]", "8193 characters"),
        (["t"] * 65, "texts", "at most 64"),
    ],
    ids=["no-texts", "empty-text", "blank-text", "text-too-long", "too-many-texts"],
)
async def test_invalid_requests_name_the_field(
    stub: embedding_pb2_grpc.EmbeddingServiceStub, texts: list[str], field: str, problem: str
) -> None:
    error = await rejected(stub, texts)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith(f"{field}: "), details
    assert problem in details


async def test_sigterm_finishes_in_flight_calls_and_exits_0() -> None:
    address = f"127.0.0.1:{free_port()}"
    with run_service(
        "embedding_service", embedding_env(address), address, timeout=MODEL_STARTUP_TIMEOUT_S
    ) as process:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            # Three batches of 64 texts of ~20 tokens: about a second each here, so work is left at SIGTERM.
            texts = [f"sentence number {i} about shutting servers down gracefully " * 2 for i in range(32)]
            calls = [asyncio.ensure_future(embed(stub, texts)) for _ in range(6)]
            # Stop it once every call has reached the batcher (the service logs each at DEBUG).
            await asyncio.to_thread(
                wait_for_log_entry,
                process,
                lambda entry: entry.get("msg") == "request queued" and entry.get("requests") == len(calls),
                MODEL_STARTUP_TIMEOUT_S,
            )
            process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*calls)
        assert all(vectors.shape == (32, 384) for vectors in results)
        # Only one SIGTERM: the service restores the default handler while it drains.
        returncode = await asyncio.to_thread(process.wait, 30)
        messages = [entry.get("msg") for entry in log_entries(process)]
        log = process.output()
    assert returncode == 0, log[-3000:]
    # The drain really happened: batches were still being encoded after the shutdown began.
    shutdown = messages.index("shutting down")
    assert "batch encoded" in messages[shutdown:], log[-3000:]
    assert "stopped" in messages[shutdown:]
    assert '"failed_batches": 0' in log
