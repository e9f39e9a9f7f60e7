"""PLACEHOLDER until the cache-verify branch lands (replaced by the real rule)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    score: float
    question: str


@dataclass(frozen=True)
class VerificationRule:
    threshold: float = 0.9

    def choose(self, query: str, candidates: Sequence[Candidate]) -> int | None:
        if candidates and candidates[0].score >= self.threshold:
            return 0
        return None
