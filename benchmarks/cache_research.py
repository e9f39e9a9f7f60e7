"""Research bench of the semantic cache's verification rule (`chat_service.cache.verification`).

GPTCache's method on the two pair files of /work/shared/bench-data: every distinct `origin` becomes a cache
entry; every `similar` is a query. A hit on the pair's own origin is a true hit, a hit on any other entry a
false hit (someone else's answer served), no hit a miss. precision = true / (true + false),
hit rate = (true + false) / queries. Entries are the *distinct* origin texts (a few origins repeat).

One correction, needed on Quora: its questions recur across pairs, so 15% of the queries are, word for
word, the origin of *another* pair, and many more are that origin's labelled duplicate. GPTCache's strict
count calls serving those a false hit, which no rule can avoid short of refusing identical questions. So a
hit also counts as true when the served entry is the query's identical text or is labelled a duplicate of
the query by another pair of the same file (`precision`); the strict count is reported alongside
(`precision_strict`). See docs/cache-verification.md.

Everything is in-process (no vector service): embeddings by the production encoder code, cached under
--cache-dir, then an exact top-k search with numpy. Pairs [0, n/2) of each file are the tuning half,
[n/2, n) the reporting half; both halves query the same index (all distinct origins of the file). One JSON
line per operating point, for three rules on the reporting half:

- `cosine`: serve the top-1 if its cosine >= threshold;
- `margin`: serve the top-1 if its cosine >= `cosine` and it leads the top-2 by >= `margin` (the upper
  envelope of a grid, i.e. tuned on the reporting half itself: a generous baseline);
- `verified`: `VerificationRule(threshold=t).choose`, the production code; the default is `"chosen": true`.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/cache_research.py
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/cache_research.py --fit   # refit the weights

`--fit` fits the rule's logistic weights on the tuning halves only (numpy, L2-regularised Newton steps) and
prints them as Python to paste into verification.py, with the tuning-half curve of the refitted model.

`--twins` prints, instead of the curves, the shipped rule's hits and misses grouped by each query's *twin
score*: the cosine between the pair's own origin and the closest stored entry that is not right for the
query. A high twin score means the file holds, under another label, a near paraphrase of the right entry,
so a query between the two has no right answer that its text could reveal (docs/cache-verification.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from chat_service.cache import verification
from chat_service.cache.verification import (
    DEFAULT_THRESHOLD,
    FEATURE_NAMES,
    Candidate,
    VerificationRule,
    candidate_evidence,
)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "bench-data"
FILES = {"gptcache_mock": "gptcache_mock_pairs.json", "quora": "qqp_duplicate_pairs.json"}
TARGETS = {"gptcache_mock": (0.99, 0.80), "quora": (0.98, 0.55)}

Matrix = npt.NDArray[np.float32]

MOCK_WEIGHT = 20.0
"""Weight of a mock lookup against a Quora one in `--fit` (500 mock lookups against 10,000 per half)."""

TWIN_NEIGHBOURS = 20
"""Nearest entries looked at per origin for its twin (a twin not among them scores 0: far enough)."""

TWIN_BINS = (0.95, 0.9, 0.85, 0.8, 0.0)
"""Lower bounds of the `--twins` bins of twin scores."""

VERIFIED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
"""Operating points of the verified rule on the curve (the shipped default is added)."""


@dataclass(frozen=True)
class Lookup:
    """One query of the benchmark: its text, its top-k candidates and which of them is right."""

    query: str
    candidates: list[Candidate]
    truth: int
    """Entry id of the pair's own origin."""
    acceptable: frozenset[int]
    """Entry ids whose answer is right for the query: its own origin, an identical question, and the
    questions another pair of the file labels as duplicates of the query."""
    entries: list[int]
    """Entry id of each candidate."""
    twin_score: float | None
    """Cosine between the pair's own origin and the stored entry closest to it that is *not* right for
    the query: how near a paraphrase of the right entry the file also holds under another label. Only
    computed for `--twins` (None otherwise): it costs a search of every entry against all the others."""


@dataclass(frozen=True)
class Bench:
    name: str
    tune: list[Lookup]
    report: list[Lookup]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help="directory of the pair files")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/cache-research"))
    parser.add_argument("--k", type=int, default=10, help="candidates per lookup (vector search top-k)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for embedding")
    parser.add_argument("--fit", action="store_true", help="refit the rule's weights on the tuning halves")
    parser.add_argument(
        "--half", choices=["report", "tune"], default="report", help="which half the curves are measured on"
    )
    parser.add_argument(
        "--twins",
        action="store_true",
        help="instead of the curves: the default rule's hits and misses by how close a twin the file holds",
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def embed(texts: list[str], cache_dir: Path, threads: int) -> Matrix:
    """Unit vectors of `texts` by the production encoder, cached on disk by a hash of model and texts."""
    from embedding_service.encoder import (
        SentenceTransformerEncoder,
        load_sentence_transformer,
        resolve_model_path,
    )

    path = resolve_model_path(None)
    digest = hashlib.sha256("\n".join([str(path), *texts]).encode()).hexdigest()[:16]
    cached = cache_dir / f"embeddings-{digest}.npy"
    if cached.exists():
        return np.asarray(np.load(cached), dtype=np.float32)
    log(f"embedding {len(texts)} texts (cached afterwards in {cached})")
    encoder = SentenceTransformerEncoder(load_sentence_transformer(path, threads), "all-MiniLM-L6-v2")
    started = time.perf_counter()
    # Batches of similar lengths pad little: several times faster than batches in file order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = np.zeros((len(texts), encoder.dimension), dtype=np.float32)
    batch = 64
    for start in range(0, len(texts), batch):
        chunk = order[start : start + batch]
        vectors[chunk] = encoder.encode([texts[i] for i in chunk])
        done = start + len(chunk)
        if done % (batch * 16) == 0 or done == len(texts):
            elapsed = time.perf_counter() - started
            left = elapsed / done * (len(texts) - done)
            log(f"  {done}/{len(texts)} texts, {elapsed:.0f} s ~{left:.0f}+ s left (longest texts last)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cached, vectors)
    return vectors


def top_k(queries: Matrix, index: Matrix, k: int) -> tuple[npt.NDArray[np.int64], Matrix]:
    """Exact top-k by dot product (= cosine on unit vectors), best first, in chunks to bound memory."""
    ids, scores = [], []
    for i in range(0, len(queries), 1024):
        sims = queries[i : i + 1024] @ index.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        ids.append(np.take_along_axis(part, order, axis=1))
        scores.append(np.take_along_axis(part_scores, order, axis=1))
    return np.concatenate(ids), np.concatenate(scores)


def normalise(text: str) -> str:
    """Lower case, no accents, words separated by single spaces, no punctuation."""
    folded = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode()
    return " ".join(re.findall(r"[a-z0-9]+", folded))


def load_bench(name: str, args: argparse.Namespace) -> Bench:
    """Embed one pair file, search every query's top-k, and split the lookups into halves."""
    pairs = json.loads((args.data / FILES[name]).read_text())
    entries = list(dict.fromkeys(p["origin"] for p in pairs))
    entry_id = {text: i for i, text in enumerate(entries)}
    queries = [p["similar"] for p in pairs]
    vectors = embed(entries + queries, args.cache_dir, args.threads)
    ids, scores = top_k(vectors[len(entries) :], vectors[: len(entries)], args.k)
    # Each entry's nearest other entries (the first is itself), for `Lookup.twin_score`.
    near = top_k(vectors[: len(entries)], vectors[: len(entries)], TWIN_NEIGHBOURS) if args.twins else None
    # Duplicates by the file's own labels, both directions; texts that differ only in case, accents,
    # spacing or punctuation are the same question.
    duplicates: dict[str, set[str]] = {}
    for pair in pairs:
        origin, similar = normalise(pair["origin"]), normalise(pair["similar"])
        duplicates.setdefault(origin, {origin}).add(similar)
        duplicates.setdefault(similar, {similar}).add(origin)
    entries_of: dict[str, set[int]] = {}
    for i, text in enumerate(entries):
        entries_of.setdefault(normalise(text), set()).add(i)
    lookups = []
    for q, (query, pair) in enumerate(zip(queries, pairs, strict=True)):
        truth = entry_id[pair["origin"]]
        acceptable = {truth}
        for text in duplicates[normalise(query)]:
            acceptable.update(entries_of.get(text, ()))
        lookups.append(
            Lookup(
                query=query,
                candidates=[Candidate(float(s), entries[j]) for j, s in zip(ids[q], scores[q], strict=True)],
                truth=truth,
                acceptable=frozenset(acceptable),
                entries=[int(j) for j in ids[q]],
                twin_score=None
                if near is None
                else next(
                    (
                        float(score)
                        for entry, score in zip(near[0][truth], near[1][truth], strict=True)
                        if entry not in acceptable
                    ),
                    0.0,
                ),
            )
        )
    half = len(lookups) // 2
    return Bench(name, lookups[:half], lookups[half:])


def measure(lookups: Sequence[Lookup], decide: Callable[[Lookup], int | None]) -> dict[str, float]:
    """GPTCache's counts for one decision function (candidate position or None) over `lookups`."""
    true = false = strict = 0
    for lookup in lookups:
        chosen = decide(lookup)
        if chosen is None:
            continue
        entry = lookup.entries[chosen]
        if entry in lookup.acceptable:
            true += 1
        else:
            false += 1
        strict += entry == lookup.truth
    hits = true + false
    return {
        "precision": round(true / hits, 4) if hits else 1.0,
        "hit_rate": round(hits / len(lookups), 4),
        "true": true,
        "false": false,
        "misses": len(lookups) - hits,
        "precision_strict": round(strict / hits, 4) if hits else 1.0,
    }


def cosine_rule(threshold: float) -> Callable[[Lookup], int | None]:
    return lambda lookup: 0 if lookup.candidates[0].score >= threshold else None


def margin_rule(threshold: float, margin: float) -> Callable[[Lookup], int | None]:
    def decide(lookup: Lookup) -> int | None:
        first, second = lookup.candidates[0].score, lookup.candidates[1].score
        return 0 if first >= threshold and first - second >= margin else None

    return decide


def upper_envelope(points: list[dict[str, float]]) -> list[dict[str, float]]:
    """The points that no other point beats on both precision and hit rate, best precision first."""
    envelope: list[dict[str, float]] = []
    for point in sorted(points, key=lambda p: (-p["hit_rate"], -p["precision"])):
        # Every point already kept has a higher hit rate; keep this one only if it is more precise.
        if not envelope or point["precision"] > envelope[-1]["precision"]:
            envelope.append(point)
    return envelope[::-1]


def verified_rule(threshold: float) -> Callable[[Lookup], int | None]:
    """The production rule (`VerificationRule.choose`, defaults but `threshold`) as a decision function."""
    rule = replace(VerificationRule(), threshold=threshold)
    return lambda lookup: rule.choose(lookup.query, lookup.candidates)


def curves(bench: Bench, lookups: Sequence[Lookup]) -> Iterator[dict[str, object]]:
    """The JSON records of the three rules on `lookups`."""
    for threshold in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
        yield {
            "data": bench.name,
            "rule": "cosine",
            "threshold": threshold,
            **measure(lookups, cosine_rule(threshold)),
        }
    grid = [
        {"cosine": t, "margin": m, **measure(lookups, margin_rule(t, m))}
        for t in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
        for m in (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2)
    ]
    for point in upper_envelope(grid):
        yield {"data": bench.name, "rule": "margin", "threshold": point["margin"], **point}
    for threshold in sorted({*VERIFIED_THRESHOLDS, DEFAULT_THRESHOLD}):
        record: dict[str, object] = {
            "data": bench.name,
            "rule": "verified",
            "threshold": threshold,
            **measure(lookups, verified_rule(threshold)),
        }
        if threshold == DEFAULT_THRESHOLD:
            record["chosen"] = True
        yield record


def twins(bench: Bench, lookups: Sequence[Lookup]) -> Iterator[dict[str, object]]:
    """The default rule's outcome by twin score: whether the file also holds, under another label, an
    entry nearly as close to the right one as a paraphrase is (`Lookup.twin_score`)."""
    decide = verified_rule(DEFAULT_THRESHOLD)
    upper = 1.01
    for lower in TWIN_BINS:
        selected = [
            lookup
            for lookup in lookups
            if lookup.twin_score is not None and lower <= lookup.twin_score < upper
        ]
        yield {"data": bench.name, "twin_score": [lower, min(upper, 1.0)], **measure(selected, decide)}
        upper = lower


def fit_logistic(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    offset: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64],
    l2: float,
) -> npt.NDArray[np.float64]:
    """Weighted, L2-regularised logistic regression with a fixed offset in the logit (the hand-set
    penalties), by Newton steps. Returns the raw-scale coefficients, the intercept last."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    beta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(z @ beta + offset)))
        gradient = z.T @ (weights * (p - y)) + penalty * beta
        hessian = (z * (weights * p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-9:
            break
    # Back to the raw feature scale, so verification.py needs no standardisation.
    raw = beta[:-1] / std
    intercept = beta[-1] - float((beta[:-1] * mean / std).sum())
    return np.append(raw, intercept)


def fit(benches: list[Bench]) -> None:
    """Fit the logistic weights on the tuning halves, print them, and use them for this run's curves."""
    rows, labels, offsets, weights = [], [], [], []
    for bench in benches:
        # The mock pairs are 20 times fewer than the Quora ones; weighting them 20x lets both count as much.
        weight = MOCK_WEIGHT if bench.name == "gptcache_mock" else 1.0
        for lookup in bench.tune:
            evidence = candidate_evidence(lookup.query, lookup.candidates)
            # Only the top candidate (by cosine) of each lookup: it is the one the rule serves or refuses
            # nearly always, and the far candidates, easy negatives, would otherwise set the weights.
            top = max(range(len(lookup.candidates)), key=lambda i: lookup.candidates[i].score)
            item = evidence[top]
            if item.vetoed or lookup.candidates[top].score < VerificationRule().min_score:
                continue  # never served, so nothing to learn from
            rows.append(item.features)
            labels.append(float(lookup.entries[top] in lookup.acceptable))
            offsets.append(-item.penalty)
            weights.append(weight)
    beta = fit_logistic(
        np.asarray(rows, dtype=np.float64),
        np.asarray(labels),
        np.asarray(offsets),
        np.asarray(weights),
        l2=1.0,
    )
    print(f"# fitted on {len(rows)} top candidates of the tuning halves", file=sys.stderr)
    print("_WEIGHTS: Final[tuple[float, ...]] = (", file=sys.stderr)
    for name, w in zip(FEATURE_NAMES, beta[:-1], strict=True):
        print(f"    {w:.4f},  # {name}", file=sys.stderr)
    print(")", file=sys.stderr)
    print(f"_INTERCEPT: Final = {beta[-1]:.4f}", file=sys.stderr)
    verification._WEIGHTS = tuple(float(w) for w in beta[:-1])  # type: ignore[misc]
    verification._INTERCEPT = float(beta[-1])  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    benches = [load_bench(name, args) for name in FILES]
    if args.fit:
        fit(benches)
    for bench in benches:
        lookups = bench.report if args.half == "report" else bench.tune
        for record in (twins if args.twins else curves)(bench, lookups):
            print(json.dumps({"half": args.half, **record}), flush=True)


if __name__ == "__main__":
    main()
