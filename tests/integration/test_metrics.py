"""Prometheus metrics of every service, scraped over HTTP after real traffic: the inference service (the
bundled model on llama-server), the embedding service (real model, local-mode vector index) and a chat
service with the semantic cache on SQLite. Each service here is the test's own, so the counters move by
exactly what the test did."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from tests.support.chat import ChatClient
from tests.support.metrics import scrape, total
from tests.support.services import cache_entries
from tests.support.stack import chat_service, embedding_service, free_address, inference_service
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
PARAPHRASE = "What's the capital of France?"
"""The base model answers QUESTION with a short sentence that ends on its own (`stop`)."""

SERVICES = ("chat", "inference", "embedding")


@dataclass
class Mesh:
    chat: str
    embedding: str
    chat_metrics: str
    inference_metrics: str
    embedding_metrics: str


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("metrics")
    metrics = {name: free_address() for name in ("inference", "embedding", "chat")}
    with (
        inference_service(metrics_address=metrics["inference"]) as inference,
        embedding_service(tmp / "qdrant", metrics_address=metrics["embedding"]) as embedding,
        chat_service(
            f"sqlite+aiosqlite:///{tmp / 'chat.db'}",
            inference.address,
            cache_address=embedding.address,
            cache_lookup_timeout_s=10,
            metrics_address=metrics["chat"],
        ) as chat,
    ):
        yield Mesh(
            chat.address, embedding.address, metrics["chat"], metrics["inference"], metrics["embedding"]
        )


async def test_counters_move_by_what_the_traffic_did(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.chat) as channel:
        alice = ChatClient(channel)

        async def entries() -> int:
            return await cache_entries(mesh.embedding, "chat_answers", {"owner": alice.user})

        # Counting entries searches with a fixed text; the service embeds it once, before the counts.
        assert await entries() == 0
        before = {name: scrape(getattr(mesh, f"{name}_metrics")) for name in SERVICES}

        generated = await alice.create(QUESTION, max_tokens=48, temperature=0)
        assert generated.last is not None and generated.last.finish_reason == pb.FINISH_REASON_STOP
        skipped = await alice.create("Name a colour.", max_tokens=8, temperature=0, skip_cache=True)
        assert skipped.last is not None

        async def answer_stored() -> bool:
            return await entries() == 1

        await eventually(answer_stored, "the first answer never reached the cache")
        cached = await alice.create(PARAPHRASE, max_tokens=48, temperature=0)
        assert cached.last is not None and cached.last.cached

    after = {name: scrape(getattr(mesh, f"{name}_metrics")) for name in SERVICES}

    def moved(service: str, name: str, **labels: str) -> float:
        return total(after[service], name, **labels) - total(before[service], name, **labels)

    # The engine generated two answers (the question, and the one that skipped the cache).
    assert moved("inference", "gen_ai_server_time_to_first_token_seconds_count") == 2
    assert moved("inference", "gen_ai_server_request_duration_seconds_count") == 2
    generated_tokens = generated.last.usage.completion_tokens + skipped.last.usage.completion_tokens
    prompt_tokens = generated.last.usage.prompt_tokens + skipped.last.usage.prompt_tokens
    assert moved("inference", "gen_ai_server_tokens_total", gen_ai_token_type="output") == generated_tokens
    assert moved("inference", "gen_ai_server_tokens_total", gen_ai_token_type="input") == prompt_tokens
    for gauge in ("chatmesh_inference_running_generations", "chatmesh_inference_queue_depth"):
        # Per served model: the series is there (an absent one would read as 0) and back at zero.
        series = (gauge, frozenset({("gen_ai_request_model", "gemma-3-270m")}))
        assert series in after["inference"], sorted(k for k in after["inference"] if k[0] == gauge)
        assert after["inference"][series] == 0
    assert moved("inference", "chatmesh_inference_admission_rejections_total") == 0

    # Three completions: two generated (one of them `stop`), one from the cache.
    assert moved("chat", "chatmesh_chat_completions_total") == 3
    assert moved("chat", "chatmesh_chat_completions_total", cached="true", outcome="stop") == 1
    assert moved("chat", "chatmesh_chat_completions_total", cached="false", outcome="stop") >= 1
    # Two lookups (the skip looked nothing up): the first question missed, its paraphrase hit.
    assert moved("chat", "chatmesh_chat_cache_lookups_total", result="miss") == 1
    assert moved("chat", "chatmesh_chat_cache_lookups_total", result="hit") == 1
    assert moved("chat", "chatmesh_chat_cache_lookups_total", result="error") == 0
    assert moved("chat", "chatmesh_chat_history_strategy_total", strategy="full") == 2
    assert moved("chat", "chatmesh_chat_store_statement_seconds_count", kind="insert") >= 6

    # The embedding service encoded two texts, one per lookup: storing the answer reused the question's
    # vector from its lookup.
    assert moved("embedding", "chatmesh_embedding_texts_total") == 2
    assert moved("embedding", "chatmesh_embedding_batch_size_count") == 2
    assert moved("embedding", "chatmesh_embedding_queue_wait_seconds_count") == 2
