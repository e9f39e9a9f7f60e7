"""The sampling ranges (chatmesh.common.sampling) as the chat API and the inference service report them:
the same problem text on both, each naming the field as its own contract spells it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chat_service.inference import SamplingOptions
from chat_service.validation import sampling_options
from chatmesh.common.errors import InvalidArgument
from chatmesh.common.sampling import MAX_SEED
from chatmesh.inference.v1 import inference_pb2 as pb
from inference_service.backends.base import ModelInfo, Prompt
from inference_service.validation import parse_sampling

CONTEXT = 100


def error_of(check: Callable[[], object]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        check()
    return err.value


def chat(
    max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None
) -> object:
    return sampling_options(max_tokens, temperature, top_p, None, CONTEXT)


def inference(params: pb.SamplingParams) -> object:
    prompt = Prompt(text="x", token_ids=[1])
    info = ModelInfo(model="m", context_length=CONTEXT, backend="fake")
    return parse_sampling(params, prompt, info, 50, (), 2, 4)


@pytest.mark.parametrize(
    ("chat_check", "inference_check", "field", "problem"),
    [
        (
            lambda: chat(max_tokens=0),
            lambda: inference(pb.SamplingParams(max_tokens=0)),
            "max_tokens",
            "must be between 1 and 100, got 0",
        ),
        (
            lambda: chat(temperature=2.5),
            lambda: inference(pb.SamplingParams(temperature=2.5)),
            "temperature",
            "must be between 0 and 2, got 2.5",
        ),
        (
            lambda: chat(top_p=0.0),
            lambda: inference(pb.SamplingParams(top_p=0.0)),
            "top_p",
            "must be in (0, 1], got 0.0",
        ),
    ],
)
def test_both_services_report_a_range_alike(
    chat_check: Callable[[], object], inference_check: Callable[[], object], field: str, problem: str
) -> None:
    error = error_of(chat_check)
    assert (error.field, error.problem) == (field, problem)
    error = error_of(inference_check)
    assert (error.field, error.problem) == (f"sampling.{field}", problem)


def test_the_ends_of_each_range_are_accepted() -> None:
    for ends in ((CONTEXT, 2.0, 1.0, MAX_SEED), (1, 0.0, 1e-9, 0)):
        assert sampling_options(*ends, CONTEXT) == SamplingOptions(*ends)


def test_a_seed_past_uint64_is_rejected_by_the_chat_api() -> None:
    error = error_of(lambda: sampling_options(None, None, None, MAX_SEED + 1, CONTEXT))
    assert (error.field, error.problem) == ("seed", f"must be between 0 and {MAX_SEED}, got {MAX_SEED + 1}")


def test_stop_limits_name_the_list_or_the_sequence() -> None:
    too_many = error_of(lambda: inference(pb.SamplingParams(stop=["a", "b", "c"])))
    assert (too_many.field, too_many.problem) == ("sampling.stop", "at most 2 stop sequences, got 3")
    too_long = error_of(lambda: inference(pb.SamplingParams(stop=["a", "abcde"])))
    assert (too_long.field, too_long.problem) == ("sampling.stop[1]", "must be 1 to 4 characters")
