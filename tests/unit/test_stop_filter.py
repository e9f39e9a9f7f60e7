"""StopSequenceFilter: streamed text is cut exactly where a plain search of the whole text would cut it."""

from __future__ import annotations

import random

import pytest

from inference_service.backends.text import LeadingSpaceTrimmer
from inference_service.backends.triton import StopSequenceFilter


def stream(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    stop_filter = StopSequenceFilter(stops)
    released = "".join(stop_filter.feed(piece) for piece in pieces)
    return released + stop_filter.flush(), stop_filter.stopped


def expected(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@pytest.mark.parametrize(
    ("pieces", "stops", "result"),
    [
        (["Paris.", "\nUs", "er: hi"], ["\nUser:"], ("Paris.", True)),
        (["a\nU", "b"], ["\nUser:"], ("a\nUb", False)),  # a held-back prefix is released when it diverges
        (["x", "END", "more"], ["END", "ND"], ("x", True)),
        (["no stop here"], [], ("no stop here", False)),
    ],
)
def test_known_cases(pieces: list[str], stops: list[str], result: tuple[str, bool]) -> None:
    assert stream(pieces, stops) == result


def test_random_splits_match_a_search_of_the_whole_text() -> None:
    rng = random.Random(7)
    alphabet = "ab\nU:"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))
        ]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(pieces, stops) == expected(text, stops), (pieces, stops)


def test_leading_space_trimmer_drops_only_the_first_whitespace() -> None:
    trimmer = LeadingSpaceTrimmer()
    assert [trimmer.feed(p) for p in [" ", "\n", " Hello", " world"]] == ["", "", "Hello", " world"]
