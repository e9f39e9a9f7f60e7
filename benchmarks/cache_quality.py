"""Semantic cache quality: precision and hit rate on real paraphrase pairs, GPTCache's method, through
the real vector service and the chat service's own cache code.

For each pairs file (`--pairs`, default both files in ../shared/bench-data): every `origin` is stored as
a cache entry of one user (answer: its index) with `SemanticCache.entry`, into an empty collection of the
embedding service's vector index (local mode, a fresh directory); then every `similar` of the reporting
half (the second half: the rule's weights were fitted on the first halves, see
docs/cache-verification.md) is looked up with `SemanticCache.search` (the same filters as a chat's
lookup) and judged with the same `VerificationRule` the chat service uses. A hit returning the pair's own
origin is a true hit, any other a false hit (someone else's answer served), no hit a miss; as in
docs/cache-verification.md, an entry whose question is the query's own text or a labelled duplicate of
it (by another pair of the file) also counts as right (`precision`); GPTCache's strict count (only the
pair's own origin is right) is `precision_strict`. On the Quora file about 15% of the queries are, word
for word, the origin of another pair, which the strict count calls false whatever the rule does.

Prints one JSON line per operating point: the plain cosine top-1 rule and the verification rule at
several thresholds, with `{"file", "rule", "threshold", "precision", "precision_strict", "hit_rate",
"true", "false", "queries"}`; the last line of each file is the shipped default, marked
`"chosen": true`, decided by `SemanticCache.answer` itself (the exact production decision).

Targets (issue 9), at the default: GPTCache mock pairs precision >= 99% with hit rate >= 80%; Quora pairs
precision >= 98% with hit rate >= 55%.

    .venv/bin/python benchmarks/cache_quality.py [--pairs FILE ...] [--sample 2000]

`--sample N` looks up N queries of the reporting half (a fixed random sample) instead of all of them:
local mode evaluates the scope filter point by point, so a lookup among 20,000 entries takes about a
tenth of a second here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from chatmesh.common.settings import env_for
from embedding_service.settings import EmbeddingSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache_research import normalise  # a sibling script: this folder is on the path

from chat_service.cache.policy import CachePolicy, Question, SemanticCache
from chat_service.cache.verification import Candidate, VerificationRule
from chatmesh.vectors.client import GrpcVectorClient
from tests.support.processes import free_port, run_service

DATA = Path(__file__).resolve().parents[2] / "shared" / "bench-data"
FILES = [DATA / "gptcache_mock_pairs.json", DATA / "qqp_duplicate_pairs.json"]
COSINE_THRESHOLDS = [0.70, 0.75, 0.80, 0.85, 0.90, 0.95]
RULE_THRESHOLDS = [0.50, 0.70, 0.80, 0.90, 0.93, 0.95, 0.97, 0.98, 0.99]
USER = "quality-bench"


def question(text: str) -> Question:
    # One user, no system prompt, no earlier turns: every entry shares the query's scope and context.
    return Question(USER, uuid.uuid4(), "", (), text, "bench")


Counts = list[int]
"""[right, wrong, right by the strict count]"""


@dataclass(frozen=True)
class Judged:
    """Which of a query's hits would be a right answer, by the relaxed and by the strict count."""

    right: list[bool]
    own: list[bool]

    def tally(self, counts: Counts, chosen: int) -> None:
        counts[0 if self.right[chosen] else 1] += 1
        counts[2] += self.own[chosen]


def point(name: str, file: str, threshold: float, counts: Counts, queries: int) -> dict[str, object]:
    true, false, strict = counts
    hits = true + false
    return {
        "file": file,
        "rule": name,
        "threshold": threshold,
        "precision": round(true / hits, 4) if hits else None,
        "precision_strict": round(strict / hits, 4) if hits else None,
        "hit_rate": round(hits / queries, 4),
        "true": true,
        "false": false,
        "queries": queries,
    }


async def store_origins(cache: SemanticCache, vectors: GrpcVectorClient, pairs: list[dict[str, str]]) -> None:
    """Every origin as a cache entry whose answer is its index."""
    print(f"storing {len(pairs)} origins...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    for start in range(0, len(pairs), 64):
        batch = [
            cache.entry(question(p["origin"]), str(start + i), 0)
            for i, p in enumerate(pairs[start : start + 64])
        ]
        await vectors.upsert(cache.collection, batch)
        if (start // 64) % 40 == 0:
            print(f"  {start + len(batch)}/{len(pairs)}", file=sys.stderr, flush=True)
    print(f"  stored in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


async def measure(cache: SemanticCache, name: str, pairs: list[dict[str, str]], sample: int | None) -> None:
    """Look up the reporting half's queries and print the operating points."""
    report = list(range(len(pairs) // 2, len(pairs)))
    if sample and sample < len(report):
        report = sorted(random.Random(9).sample(report, sample))
    duplicates: dict[str, set[str]] = {}
    for pair in pairs:
        origin, similar = normalise(pair["origin"]), normalise(pair["similar"])
        duplicates.setdefault(origin, {origin}).add(similar)
        duplicates.setdefault(similar, {similar}).add(origin)
    rule = VerificationRule()
    cosine: dict[float, Counts] = {t: [0, 0, 0] for t in COSINE_THRESHOLDS}
    verified: dict[float, Counts] = {t: [0, 0, 0] for t in RULE_THRESHOLDS}
    default: Counts = [0, 0, 0]
    started = time.perf_counter()
    for done, index in enumerate(report, start=1):
        asked = question(pairs[index]["similar"])
        hits = await cache.search(asked)
        same = duplicates[normalise(asked.text)]
        own = [hit.payload.get("answer") == str(index) for hit in hits]
        right = [o or normalise(str(h.payload["question"])) in same for o, h in zip(own, hits, strict=True)]
        judged = Judged(right, own)
        if hits:
            for t, counts in cosine.items():
                if hits[0].score >= t:
                    judged.tally(counts, 0)
        verdict = rule.assess(asked.text, [Candidate(h.score, str(h.payload["question"])) for h in hits])
        for t, counts in verified.items():
            if verdict is not None and verdict.confidence >= t:
                judged.tally(counts, verdict.index)
        served = cache.answer(asked, hits)  # the production decision, at the default threshold
        if served is not None:
            judged.tally(default, next(i for i, h in enumerate(hits) if h.id == served.entry_id))
        if done % 500 == 0:
            rate = done / (time.perf_counter() - started)
            print(f"  {done}/{len(report)} lookups ({rate:.0f}/s)", file=sys.stderr, flush=True)
    queries = len(report)
    for t, counts in cosine.items():
        print(json.dumps(point("cosine top-1", name, t, counts, queries)))
    for t, counts in verified.items():
        print(json.dumps(point("verification rule", name, t, counts, queries)))
    chosen = point("verification rule", name, rule.threshold, default, queries)
    print(json.dumps({**chosen, "chosen": True}), flush=True)


async def run(files: dict[str, list[dict[str, str]]], sample: int | None) -> None:
    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as run_dir:
        env = env_for(
            EmbeddingSettings, address=address, vectors_path=f"{run_dir}/qdrant", log_level="WARNING"
        )
        print("starting the embedding service...", file=sys.stderr, flush=True)
        with run_service("embedding_service", env, address, timeout=180):
            async with grpc.aio.insecure_channel(address) as channel:
                vectors = GrpcVectorClient(channel, search_timeout_s=60, write_timeout_s=120)
                for name, pairs in files.items():
                    print(f"{name}:", file=sys.stderr, flush=True)
                    policy = CachePolicy(collection=f"quality_{Path(name).stem}")
                    cache = SemanticCache(vectors, policy, VerificationRule())
                    await store_origins(cache, vectors, pairs)
                    await measure(cache, name, pairs, sample)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=Path, nargs="+", default=FILES)
    parser.add_argument("--sample", type=int, default=None, help="queries per file (default: all)")
    args = parser.parse_args()
    files = {path.name: json.loads(path.read_text()) for path in args.pairs}
    asyncio.run(run(files, args.sample))


if __name__ == "__main__":
    main()
