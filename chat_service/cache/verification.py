"""The verification rule of the semantic cache: may a stored answer be served for a new question?

The vector search returns the k stored questions nearest to the query, with their cosine scores. Cosine
alone is a poor judge: on real user questions (Quora) the top-1 at cosine >= 0.9 is someone else's
question 17% of the time, because questions on one topic crowd together ("How do I learn Java?" /
"... Python?") and a question often has several stored near-duplicates. This rule scores every
candidate with a small logistic model over features a reader can check (FEATURE_NAMES):

- the cosine score and, above all, its *lead* over the best other candidate: a query that sits between
  two stored questions is ambiguous, whichever it is closer to;
- identical wording (case and punctuation aside): the commonest cache hit, always safe;
- the share of content words (stopwords removed, crudely stemmed) found on one side only, and the length
  ratio: a paraphrase rewords, a different question asks about something else.

On top of the fitted model, three disagreements that embeddings blur are imposed by hand: conflicting
numbers and a negation on one side only veto a candidate; a name replaced by another name costs a fixed
penalty in the logit. The most probable candidate is served if its probability reaches `threshold`.

The weights were fitted by `benchmarks/cache_research.py --fit` on the first half of the GPTCache mock
pairs and of 20,000 Quora duplicate pairs, then frozen here; the second halves measure the rule
(docs/cache-verification.md). Pure Python, deterministic; about 0.1 ms for ten candidates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, NamedTuple

__all__ = [
    "DEFAULT_THRESHOLD",
    "FEATURE_NAMES",
    "Candidate",
    "Evidence",
    "Verdict",
    "VerificationRule",
    "candidate_evidence",
]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One hit of the vector search."""

    score: float
    """Cosine similarity between the query's embedding and the stored question's."""
    question: str
    """The stored question text (the cache entry's payload)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The best candidate and how sure the rule is about it, before the threshold is applied."""

    index: int
    """Position of the best candidate in the sequence passed in."""
    confidence: float
    """Compared with `VerificationRule.threshold`; in [0, 1], higher is surer."""


# ---------------------------------------------------------------------------------------------------------
# Text analysis. Each stored question is analysed once (lru_cache): the same entries come back lookup after
# lookup, so in steady state a lookup analyses only the query.

_WORD: Final = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_NUMBER: Final = re.compile(r"\d+(?:[.,]\d+)*")

# Function words carry grammar, not topic: two questions that differ only in these usually mean the same.
_STOPWORD_TEXT: Final = """
    a an the and or but if then else so of to in on at by for with from into onto about as than that this
    these those there here it its it's i me my mine we us our you your yours he him his she her they them
    their is are was were be been being am do does did doing done have has had having can could will would
    shall should may might must ought get gets got getting some any all each every both much many more most
    very really just also too only even still ever one ones s t ll ve re d m
    what how why who whom whose when where which whats hows
"""
_STOPWORDS: Final = frozenset(_STOPWORD_TEXT.split())
# Negations flip a question's meaning while barely moving its embedding. "no" and "without" are left out:
# they mostly appear in paraphrases ("with no symptoms", "without streaming" = "in non-streaming mode").
_NEGATION_TEXT: Final = (
    "not never cannot cant dont doesnt didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt "
    "havent hadnt"
)
_NEGATIONS: Final = frozenset(_NEGATION_TEXT.split())
# "... or not?" and "why not?" ask the same question as the positive form.
_NEUTRALISING: Final = frozenset({"or", "why"})


def _stem(word: str) -> str:
    """A crude suffix stripper: enough to match "tips"/"tip", "studying"/"study", "used"/"use"."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


class _Text(NamedTuple):
    words: tuple[str, ...]
    stems: frozenset[str]
    content: frozenset[str]
    numbers: frozenset[str]
    entities: frozenset[str]
    negated: bool
    length: int


@lru_cache(maxsize=8192)
def _analyse(text: str) -> _Text:
    raw = _WORD.findall(text)
    words = [w.lower() for w in raw]
    negated = False
    stems = set()
    content = set()
    for i, word in enumerate(words):
        bare = word.replace("'", "")
        if bare in _NEGATIONS or word.endswith("n't"):
            negated = negated or i == 0 or words[i - 1] not in _NEUTRALISING
            continue
        stem = _stem(word)
        stems.add(stem)
        if word not in _STOPWORDS and bare not in _STOPWORDS:
            content.add(stem)
    # Digits only: number words are mostly pronouns or idioms ("how can one...", "in one go").
    numbers = set(_NUMBER.findall(text))
    # A capitalised word after the first is most often a name (Java, Trump, Paris) or an acronym; the
    # first word is capitalised anyway, so it only counts when it has capitals inside (iPhone, USA).
    entities = {
        _stem(w.lower())
        for i, w in enumerate(raw)
        if ((i > 0 and w[0].isupper()) or any(ch.isupper() for ch in w[1:]))
        and w.lower() not in _STOPWORDS
        and not w.isdigit()
    }
    return _Text(
        words=tuple(words),
        stems=frozenset(stems),
        content=frozenset(content),
        numbers=frozenset(numbers),
        entities=frozenset(entities),
        negated=negated,
        length=max(1, len(words)),
    )


# ---------------------------------------------------------------------------------------------------------
# Features and the fitted model.

FEATURE_NAMES: Final = (
    "cosine",
    "margin",
    "lead",
    "identical",
    "query_only_content",
    "candidate_only_content",
    "length_ratio",
)
"""The features of `Evidence.features`, in order; the logistic weights are fitted over these.

- cosine: the vector search's score;
- margin: score minus the best score among the *other* candidates (negative for all but the top one);
- lead: max(margin, 0) -- a clear lead over every rival counts far more than a deficit costs;
- identical: 1 when both texts have the same words (case and punctuation aside);
- query_only_content, candidate_only_content: share of each side's content-word stems missing on the
  other side (a paraphrase rewords; a different question asks about something else);
- length_ratio: |log(query words / candidate words)|.
"""

# Logistic-regression weights over FEATURE_NAMES and the intercept, fitted by
# `benchmarks/cache_research.py --fit` on the first halves of both data sets, then frozen.
_WEIGHTS: Final[tuple[float, ...]] = (
    0.8920,  # cosine
    10.4643,  # margin
    21.2655,  # lead
    7.5488,  # identical
    -1.7790,  # query_only_content
    -0.4811,  # candidate_only_content
    -0.8144,  # length_ratio
)
_INTERCEPT: Final = -0.5723

# Disagreements the benchmark labels barely see (they are rare among near neighbours) but that make a
# served answer plainly wrong, so they are imposed by hand rather than fitted; their cost in hit rate is
# measured in docs/cache-verification.md. A candidate whose numbers conflict with the query's ("iPhone 6"
# vs "iPhone 7", "500 rupee" vs "1000 rupee"), or that is negated where the query is not (or the reverse),
# is never served: "Is it not healthy to ...?" scores 0.98 against "Is it healthy to ...?", so no penalty
# short of a veto would do. A name replaced by another name takes this much off the logit, so only an
# otherwise overwhelming match survives (names are often spelled or abbreviated differently).
ENTITY_PENALTY: Final = 3.0

DEFAULT_THRESHOLD: Final = 0.96
"""The shipped operating point (docs/cache-verification.md has the precision/hit-rate curve)."""

# Without a runner-up the margin is taken against this score: a stored question this far from the query
# would not be a rival, so a lone candidate counts as unambiguous rather than as maximally ambiguous.
_NO_RIVAL_SCORE: Final = 0.5


class Evidence(NamedTuple):
    """What the rule knows about one candidate."""

    features: tuple[float, ...]
    """Values of FEATURE_NAMES."""
    penalty: float
    """Subtracted from the fitted logit: ENTITY_PENALTY when a name is replaced by another, else 0."""
    vetoed: bool
    """Numbers conflict or only one side is negated: never served, whatever the rest says."""


def _evidence(q: _Text, t: _Text, score: float, rival_score: float) -> Evidence:
    # A substitution (Java on one side, Python on the other), not a mere addition: "the Surface Pro 3"
    # and "Microsoft's Surface Pro 3" are the same question.
    entity = bool(q.entities - t.stems) and bool(t.entities - q.stems)
    numbers = bool(q.numbers) and bool(t.numbers) and q.numbers != t.numbers
    return Evidence(
        features=_features(q, t, score, rival_score),
        penalty=ENTITY_PENALTY if entity else 0.0,
        vetoed=numbers or q.negated != t.negated,
    )


def _features(q: _Text, t: _Text, score: float, rival_score: float) -> tuple[float, ...]:
    margin = score - rival_score
    return (
        score,
        margin,
        max(0.0, margin),
        float(q.words == t.words),
        len(q.content - t.content) / (len(q.content) or 1),
        len(t.content - q.content) / (len(t.content) or 1),
        abs(math.log(q.length / t.length)),
    )


def _rival_scores(candidates: Sequence[Candidate]) -> list[float]:
    """For each candidate, the best score among the others (or _NO_RIVAL_SCORE)."""
    scores = [c.score for c in candidates]
    if len(scores) < 2:
        return [_NO_RIVAL_SCORE] * len(scores)
    top = max(range(len(scores)), key=scores.__getitem__)
    second = max(s for i, s in enumerate(scores) if i != top)
    return [second if i == top else scores[top] for i in range(len(scores))]


def candidate_evidence(query: str, candidates: Sequence[Candidate]) -> list[Evidence]:
    """The evidence on every candidate, in the order given (the research script fits weights on it)."""
    q = _analyse(query)
    return [
        _evidence(q, _analyse(c.question), c.score, rival)
        for c, rival in zip(candidates, _rival_scores(candidates), strict=True)
    ]


def _logit(features: tuple[float, ...]) -> float:
    return _INTERCEPT + sum(w * f for w, f in zip(_WEIGHTS, features, strict=True))


@dataclass(frozen=True, slots=True)
class VerificationRule:
    """Decides which candidate's answer, if any, may be served for a query.

    Every candidate that is not vetoed gets a probability of asking the same question as the query (the
    logistic model over FEATURE_NAMES, minus the name-substitution penalty); the most probable one is
    served if its probability reaches `threshold`, the one knob of the precision / hit-rate trade-off.
    """

    threshold: float = DEFAULT_THRESHOLD
    """Minimum probability to serve an answer; higher means fewer but safer hits."""
    min_score: float = 0.5
    """Candidates with a lower cosine are never served (they are not paraphrases in practice)."""
    max_candidates: int = 10
    """Only the best this-many candidates by cosine are examined, bounding the cost of a lookup."""

    def assess(self, query: str, candidates: Sequence[Candidate]) -> Verdict | None:
        """The most probable candidate and its probability, or None when no candidate qualifies."""
        ranked = sorted(range(len(candidates)), key=lambda i: -candidates[i].score)[: self.max_candidates]
        if not ranked or candidates[ranked[0]].score < self.min_score:
            return None
        kept = [candidates[i] for i in ranked]
        best: Verdict | None = None
        # Every kept candidate is a rival of the others (it sets their margin), but only those above
        # min_score and not vetoed may win.
        for position, candidate, evidence in zip(ranked, kept, candidate_evidence(query, kept), strict=True):
            if candidate.score < self.min_score or evidence.vetoed:
                continue
            z = _logit(evidence.features) - evidence.penalty
            # Clamped so exp() cannot overflow on absurd inputs.
            probability = 1.0 / (1.0 + math.exp(-max(-40.0, min(40.0, z))))
            if best is None or probability > best.confidence:
                best = Verdict(position, probability)
        return best

    def choose(self, query: str, candidates: Sequence[Candidate]) -> int | None:
        """Index of the candidate whose answer may be served for `query`, or None (a miss)."""
        verdict = self.assess(query, candidates)
        if verdict is None or verdict.confidence < self.threshold:
            return None
        return verdict.index
