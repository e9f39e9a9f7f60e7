"""Semantic cache speed end to end through ChatService over gRPC: a hit, a miss, and the lookup's cost.

Starts the inference service (llama_server backend), the embedding service with the vector index on a
fresh local directory, and a chat service (SQLite) with the cache on its defaults (50 ms lookup budget),
then, for `--questions` distinct real user questions (Quora origins from ../shared/bench-data), one at a
time and interleaved, each kind taking each place in a round in turn, so that all of them see the same
machine state (what ran just before a request changes the engine's time to first token by several ms):

- miss: the question asked for the first time, cache on: time to the first text (TTFT) — lookup,
  verification, then generation;
- skip: another new question with `skip_cache` (no lookup): TTFT of the same path without the cache;
- paraphrase hit: the same stored question reworded (the pair's `similar`), timed when the verification
  rule serves it (a text the service has not embedded yet: it pays the model's forward pass, which a
  verbatim repeat does not, see `RecentEmbeddings` in embedding_service/vector_servicer.py);
- hit: a third question, whose answer was stored beforehand through the cache's own policy code
  (`SemanticCache.store`, as after a generated answer), asked in a new chat: time to the *last* event
  (the whole answer, from the cache, stored in the history). Stored beforehand because the base model
  often runs to `max_tokens`, and such answers are never cached.

The lookup's added cost on a miss is p50(miss TTFT) - p50(skip TTFT). Targets (issue 9): hit p50 <=
20 ms; added cost on a miss <= 15 ms at p50.

    .venv/bin/python benchmarks/cache_speed.py [--questions 100] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_service.cache.policy import CachePolicy, Question, SemanticCache
from chat_service.cache.verification import VerificationRule
from chat_service.inference import GrpcInferenceClient
from chatmesh.client import NO_RETRY, AsyncChatClient, Delta, Finished
from chatmesh.common.settings import env_for
from chatmesh.vectors.client import GrpcVectorClient
from embedding_service.settings import EmbeddingSettings
from tests.support.chat import token_for
from tests.support.processes import free_port, run_service
from tests.support.stack import benchmark_chat_env, inference_env

PAIRS = Path(__file__).resolve().parents[2] / "shared" / "bench-data" / "qqp_duplicate_pairs.json"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(
    client: AsyncChatClient, question: str, max_tokens: int, skip_cache: bool = False
) -> tuple[float, float, bool]:
    """(ms to the first text, ms to the last event, served from the cache) of one question, new chat."""
    started = time.perf_counter()
    first = 0.0
    cached = False
    async for event in client.stream(question, max_tokens=max_tokens, temperature=0, skip_cache=skip_cache):
        if isinstance(event, Delta) and not first:
            first = (time.perf_counter() - started) * 1000
        if isinstance(event, Finished):
            cached = event.cached
    return first, (time.perf_counter() - started) * 1000, cached


@dataclass
class Samples:
    """What each kind of question measured (ms)."""

    miss: list[float] = field(default_factory=list)
    skip: list[float] = field(default_factory=list)
    hit: list[float] = field(default_factory=list)
    paraphrase_hit: list[float] = field(default_factory=list)
    misses_served: int = 0
    hits_served: int = 0

    def add(self, kind: str, ttft: float, total: float, cached: bool) -> None:
        if kind == "miss":
            self.misses_served += not cached
            self.miss.append(ttft)
        elif kind == "skip":
            self.skip.append(ttft)
        elif kind == "hit":
            self.hits_served += cached
            if cached:
                self.hit.append(total)
        elif cached:
            self.paraphrase_hit.append(total)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--pairs", type=Path, default=PAIRS)
    args = parser.parse_args()
    pairs = json.loads(args.pairs.read_text())
    origins = [pair["origin"] for pair in pairs]
    paraphrases = [pair["similar"] for pair in pairs][2 : 3 * args.questions : 3]
    # Distinct questions, far apart in the file, for the cache's first-time and skip sides.
    asked = origins[0 : 3 * args.questions : 3]
    skipped = origins[1 : 3 * args.questions : 3]
    prefilled = origins[2 : 3 * args.questions : 3]
    inference, embedding, chat = (f"127.0.0.1:{free_port()}" for _ in range(3))
    with tempfile.TemporaryDirectory() as run_dir:
        print("starting the inference, embedding and chat services...", flush=True)
        with (
            run_service(
                "inference_service",
                inference_env(inference, run_dir=run_dir, log_level="WARNING"),
                inference,
                timeout=180,
            ),
            run_service(
                "embedding_service",
                # The service's own defaults (threads...), not the tests' embedding_env.
                env_for(
                    EmbeddingSettings,
                    address=embedding,
                    vectors_path=f"{run_dir}/qdrant",
                    log_level="WARNING",
                ),
                embedding,
                timeout=180,
            ),
            run_service(
                "chat_service",
                benchmark_chat_env(
                    chat,
                    f"sqlite+aiosqlite:///{run_dir}/chat.db",
                    inference,
                    cache_address=embedding,
                    log_level="WARNING",
                    default_history_strategy=None,
                ),
                chat,
                timeout=120,
            ),
        ):
            user = "cache-bench"
            async with (
                AsyncChatClient(chat, token=token_for(user), retry=NO_RETRY) as client,
                grpc.aio.insecure_channel(inference) as engine_channel,
                grpc.aio.insecure_channel(embedding) as vector_channel,
            ):
                engine = await GrpcInferenceClient(engine_channel).model_info()
                cache = SemanticCache(GrpcVectorClient(vector_channel), CachePolicy(), VerificationRule())
                print(f"storing {len(prefilled)} answers...", flush=True)
                for question in prefilled:
                    asked_by = Question(user, uuid.uuid4(), "", (), question, engine.model)
                    await cache.store(asked_by, f"A stored answer to: {question}", 12)
                # Warm-up: the first calls page in models and open connections.
                for warm in origins[-3:]:
                    await timed(client, warm, args.max_tokens, skip_cache=True)
                samples = Samples()
                for index, (question, other, stored, paraphrase) in enumerate(
                    zip(asked, skipped, prefilled, paraphrases, strict=True)
                ):
                    # Each kind takes each place in the round in turn: what ran just before (an idle
                    # engine after two hits, or one that has just generated) must not favour a side.
                    kinds = [("miss", question), ("skip", other), ("hit", stored), ("paraphrase", paraphrase)]
                    turn = index % len(kinds)
                    for kind, text in kinds[turn:] + kinds[:turn]:
                        samples.add(kind, *await timed(client, text, args.max_tokens, kind == "skip"))
                    if (index + 1) % 20 == 0:
                        print(f"  {index + 1}/{len(asked)} questions", flush=True)
    miss, skip, hit, paraphrase_hit = samples.miss, samples.skip, samples.hit, samples.paraphrase_hit
    print(
        f"{len(asked)} questions of each kind; new questions that missed: {samples.misses_served};"
        f" stored ones served from the cache: {samples.hits_served}"
    )
    print(f"{'':>28} {'p50':>8} {'p99':>8}")
    for name, values in (
        ("hit, whole answer", hit),
        (f"paraphrase hit ({len(paraphrase_hit)})", paraphrase_hit),
        ("miss, TTFT (cache on)", miss),
        ("skip_cache, TTFT", skip),
    ):
        print(f"{name:>28} {statistics.median(values):>6.1f}ms {pct(values, 0.99):>6.1f}ms")
    added = statistics.median(miss) - statistics.median(skip)
    print(
        f"hit p50 {statistics.median(hit):.1f} ms (target <= 20); lookup's added cost on a miss"
        f" {added:.1f} ms at p50 (target <= 15)"
    )


if __name__ == "__main__":
    asyncio.run(main())
