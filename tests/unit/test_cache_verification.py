"""VerificationRule: which cached answer, if any, may be served for a query.

Unless a comment says the score is made up, scores are the real all-MiniLM-L6-v2 cosines of these texts
(rounded to three digits), so each case is what the rule would see behind the real vector search.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from chat_service.cache.verification import (
    DEFAULT_THRESHOLD,
    ENTITY_PENALTY,
    FEATURE_NAMES,
    Candidate,
    VerificationRule,
    candidate_evidence,
)

RULE = VerificationRule()


def test_the_default_rule_uses_the_shipped_operating_point() -> None:
    assert RULE.threshold == DEFAULT_THRESHOLD


def test_a_paraphrase_with_a_clear_lead_is_served() -> None:
    query = "How can I improve my English speaking skills?"
    candidates = [
        Candidate(0.901, "How do I improve my spoken English?"),
        Candidate(0.747, "How can I improve my English writing skills?"),
        Candidate(0.385, "What is the best way to learn French?"),
    ]
    assert RULE.choose(query, candidates) == 0


def test_a_lone_paraphrase_is_served() -> None:
    assert (
        RULE.choose(
            "How can I improve my English speaking skills?",
            [Candidate(0.901, "How do I improve my spoken English?")],
        )
        == 0
    )


def test_identical_wording_wins_over_a_higher_scored_rewording() -> None:
    # Lower case and no question mark cost the stored copy cosine, not meaning.
    query = "What is the capital of France?"
    candidates = [
        Candidate(0.906, "what is the capital of France"),
        Candidate(0.942, "Which city is the capital of France?"),
        Candidate(0.663, "What is the capital of Germany?"),
    ]
    assert RULE.choose(query, candidates) == 0


def test_conflicting_numbers_are_never_served() -> None:
    query = "What is the best phone under 10000 rupees?"
    candidates = [
        Candidate(0.926, "What is the best phone under 15000 rupees?"),
        Candidate(0.787, "Which smartphone should I buy for less than 5000 rupees?"),
    ]
    assert RULE.choose(query, candidates) is None
    assert all(evidence.vetoed for evidence in candidate_evidence(query, candidates))
    # The same numbers are no conflict (made-up score).
    assert RULE.choose(query, [Candidate(0.95, "Which is the best phone under 10000 rupees?")]) == 0


def test_a_negation_on_one_side_is_never_served() -> None:
    query = "Is it healthy to drink coffee every day?"
    candidates = [
        Candidate(0.984, "Is it not healthy to drink coffee every day?"),
        Candidate(0.743, "How much coffee is too much per day?"),
    ]
    assert RULE.choose(query, candidates) is None
    # The reverse direction, and a contraction, too (made-up score).
    assert RULE.choose("Isn't it healthy to drink coffee every day?", [Candidate(0.95, query)]) is None


def test_or_not_is_not_a_negation() -> None:
    query = "Should I learn to code or not?"
    candidates = [Candidate(0.978, "Should I learn to code?"), Candidate(0.726, "Is coding hard to learn?")]
    assert RULE.choose(query, candidates) == 0


def test_a_different_named_entity_is_rejected() -> None:
    query = "Who is the CEO of Google?"
    candidates = [Candidate(0.738, "Who is the CEO of Microsoft?"), Candidate(0.741, "Who founded Google?")]
    assert RULE.choose(query, candidates) is None
    penalties = [evidence.penalty for evidence in candidate_evidence(query, candidates)]
    assert penalties == [ENTITY_PENALTY, 0.0]


def test_an_added_name_is_not_a_substitution() -> None:
    # Made-up score: only the evidence is checked.
    query = "What do you think of the Surface Pro 3?"
    evidence = candidate_evidence(query, [Candidate(0.93, "What is your review of Microsoft Surface Pro 3?")])
    assert evidence[0].penalty == 0.0
    assert not evidence[0].vetoed


def test_an_ambiguous_near_tie_is_a_miss() -> None:
    # Both stored questions are close to the query: the cache cannot tell whose answer is meant.
    query = "How do I lose weight fast?"
    candidates = [
        Candidate(0.921, "How can I lose weight quickly?"),
        Candidate(0.876, "What is the fastest way to lose weight?"),
        Candidate(0.677, "How do I gain weight fast?"),
    ]
    assert RULE.choose(query, candidates) is None
    # The same best candidate, once its rival is far behind (made-up score), is served.
    clear = [candidates[0], replace(candidates[1], score=0.70), candidates[2]]
    assert RULE.choose(query, clear) == 0


def test_no_candidates_is_a_miss() -> None:
    assert RULE.choose("How do I lose weight fast?", []) is None
    assert RULE.assess("How do I lose weight fast?", []) is None


def test_candidates_below_min_score_are_never_served() -> None:
    candidates = [Candidate(0.45, "How do I lose weight fast?")]
    assert RULE.choose("How do I lose weight fast?", candidates) is None
    assert replace(RULE, min_score=0.4).choose("How do I lose weight fast?", candidates) == 0


def test_the_index_refers_to_the_order_given() -> None:
    query = "How can I improve my English speaking skills?"
    candidates = [
        Candidate(0.385, "What is the best way to learn French?"),
        Candidate(0.747, "How can I improve my English writing skills?"),
        Candidate(0.901, "How do I improve my spoken English?"),
    ]
    assert RULE.choose(query, candidates) == 2


def test_only_max_candidates_are_examined() -> None:
    # Made-up scores for the two unrelated entries.
    query = "How can I improve my English speaking skills?"
    candidates = [
        Candidate(0.95, "What is the best phone under 10000 rupees?"),
        Candidate(0.94, "Is it healthy to drink coffee every day?"),
        Candidate(0.901, "How do I improve my spoken English?"),
    ]
    assert replace(RULE, max_candidates=2).choose(query, candidates) is None
    assert RULE.choose(query, candidates) is None  # the two unrelated ones still crowd it
    verdict = replace(RULE, threshold=0.0).assess(query, candidates)
    assert verdict is not None
    assert verdict.index == 2


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, DEFAULT_THRESHOLD, 0.99])
def test_choose_is_assess_against_the_threshold(threshold: float) -> None:
    rule = replace(RULE, threshold=threshold)
    query = "How do I lose weight fast?"
    candidates = [
        Candidate(0.921, "How can I lose weight quickly?"),
        Candidate(0.876, "What is the fastest way to lose weight?"),
    ]
    verdict = rule.assess(query, candidates)
    assert verdict is not None
    assert 0.0 <= verdict.confidence <= 1.0
    expected = verdict.index if verdict.confidence >= threshold else None
    assert rule.choose(query, candidates) == expected


def test_evidence_has_one_value_per_feature() -> None:
    evidence = candidate_evidence(
        "How do I lose weight fast?", [Candidate(0.9, "How can I lose weight quickly?")]
    )
    assert len(evidence[0].features) == len(FEATURE_NAMES)
