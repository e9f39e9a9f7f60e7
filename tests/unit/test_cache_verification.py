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
        Candidate(0.94, "How do I improve my spoken English?"),
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
        Candidate(0.94, "How do I improve my spoken English?"),
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


def test_typographic_apostrophes_are_apostrophes() -> None:
    # Made-up scores. With U+2019 for the apostrophe, "Isn't" is still a negation and "don't" the same word.
    query = "Is it healthy to drink coffee every day?"
    assert RULE.choose("Isn\u2019t it healthy to drink coffee every day?", [Candidate(0.95, query)]) is None
    copy = "What happens if you don\u2019t put your phone in airplane mode?"
    evidence = candidate_evidence(copy, [Candidate(0.99, copy.replace("\u2019", "'"))])
    assert not evidence[0].vetoed
    assert evidence[0].features[FEATURE_NAMES.index("identical")] == 1.0


def test_not_only_is_not_a_negation() -> None:
    # Made-up score: only the veto is checked.
    query = "This code can load not only one type of audio dataset but also others."
    candidate = "Other types of audio datasets can be loaded too."
    evidence = candidate_evidence(query, [Candidate(0.92, candidate)])
    assert not evidence[0].vetoed


@pytest.mark.parametrize(
    ("query", "candidate"),
    [
        (
            "No alternative to the upload page is mentioned in the document.",
            "The document doesn't mention any alternative to the upload page.",
        ),
        (
            "The builder makes a label column in the absence of metadata.",
            "If the dataset doesn't have metadata, the builder makes a label column.",
        ),
        # Negative in meaning, not in form: both from the GPTCache mock pairs.
        (
            "The `with_details` parameter is not mandatory and is set to `False` by default.",
            "The `with_details` parameter is optional and defaults to `False`.",
        ),
        (
            "It is uncertain what one may encounter after exploring the quickstart options.",
            "It is not clear what you can expect to find after going through the quickstart options.",
        ),
    ],
)
def test_a_negation_said_with_another_negative_word_is_no_conflict(query: str, candidate: str) -> None:
    # Made-up score: only the veto is checked.
    assert not candidate_evidence(query, [Candidate(0.95, candidate)])[0].vetoed


def test_a_negative_word_on_the_negated_side_only_is_still_a_conflict() -> None:
    # Made-up score: "optional" on the side that also says "not" leaves the other side plainly positive.
    query = "Is the `with_details` parameter not optional?"
    candidate = "Is the `with_details` parameter required?"
    assert candidate_evidence(query, [Candidate(0.9, candidate)])[0].vetoed


def test_a_stored_copy_of_the_candidate_is_no_rival() -> None:
    # Made-up scores: the same question stored twice (case and punctuation aside) is no ambiguity.
    query = "How do I lose weight fast?"
    candidates = [
        Candidate(0.921, "How can I lose weight quickly?"),
        Candidate(0.918, "how can I lose weight quickly"),
        Candidate(0.677, "How do I gain weight fast?"),
    ]
    assert RULE.choose(query, candidates) == 0
    margin = FEATURE_NAMES.index("margin")
    assert candidate_evidence(query, candidates)[0].features[margin] == pytest.approx(0.921 - 0.677)


def test_a_rare_word_swapped_weighs_more_than_a_common_one() -> None:
    # Made-up scores: only the features are checked.
    query = "How do I learn Java quickly?"
    rare_swap, common_swap = candidate_evidence(
        query,
        [Candidate(0.8, "How do I learn Python quickly?"), Candidate(0.8, "How can I learn Java fast?")],
    )
    query_only = FEATURE_NAMES.index("query_only_rarity")
    assert rare_swap.features[query_only] > common_swap.features[query_only]
    overlap = FEATURE_NAMES.index("rarity_overlap")
    assert rare_swap.features[overlap] < common_swap.features[overlap]


def test_different_code_identifiers_are_a_mismatch() -> None:
    # Made-up scores: only the features are checked.
    query = "How do I speed up `map()` on a dataset?"
    other, same = candidate_evidence(
        query,
        [
            Candidate(0.9, "How do I speed up `filter()` on a dataset?"),
            Candidate(0.9, "How can `map()` on a dataset be made faster?"),
        ],
    )
    mismatch = FEATURE_NAMES.index("code_mismatch")
    assert other.features[mismatch] == 1.0
    assert same.features[mismatch] == 0.0
