"""Request validation of the inference service: every error names its field."""

from __future__ import annotations

import pytest

from chatmesh.common.errors import InvalidArgument
from chatmesh.inference.v1 import inference_pb2 as pb
from inference_service.backends.base import ModelInfo, Prompt
from inference_service.prompt import TEMPLATES, Role, Turn
from inference_service.validation import parse_sampling, parse_turns

INFO = ModelInfo(model="m", context_length=100, backend="fake")


def sampling(params: pb.SamplingParams, prompt_tokens: int = 10) -> object:
    prompt = Prompt(text="x", token_ids=list(range(prompt_tokens)))
    return parse_sampling(params, prompt, INFO, 50, ("\nUser:",), 8, 64)


def test_turns_require_messages() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_turns([])
    assert err.value.field == "messages"


def test_unknown_role_names_the_index() -> None:
    messages = [
        pb.Message(role=pb.ROLE_USER, content="hi"),
        pb.Message(role=pb.ROLE_UNSPECIFIED, content="x"),
    ]
    with pytest.raises(InvalidArgument) as err:
        parse_turns(messages)
    assert err.value.field == "messages[1].role"


def test_turns_keep_roles_and_order() -> None:
    turns = parse_turns(
        [pb.Message(role=pb.ROLE_SYSTEM, content="s"), pb.Message(role=pb.ROLE_USER, content="u")]
    )
    assert turns == [Turn(Role.SYSTEM, "s"), Turn(Role.USER, "u")]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (pb.SamplingParams(max_tokens=0), "sampling.max_tokens"),
        (pb.SamplingParams(max_tokens=101), "sampling.max_tokens"),
        (pb.SamplingParams(max_tokens=95), "sampling.max_tokens"),  # 10 prompt + 95 > 100
        (pb.SamplingParams(temperature=2.5), "sampling.temperature"),
        (pb.SamplingParams(top_p=0.0), "sampling.top_p"),
        (pb.SamplingParams(stop=["x"] * 9), "sampling.stop"),
        (pb.SamplingParams(stop=[""]), "sampling.stop[0]"),
    ],
)
def test_bad_sampling_names_the_field(params: pb.SamplingParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        sampling(params)
    assert err.value.field == field


def test_prompt_longer_than_context_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as err:
        sampling(pb.SamplingParams(), prompt_tokens=100)
    assert err.value.field == "messages"


def test_defaults_fit_the_remaining_context() -> None:
    result = sampling(pb.SamplingParams(stop=["END"]), prompt_tokens=80)
    assert result.max_tokens == 20  # type: ignore[attr-defined]
    assert result.stop == ("\nUser:", "END")  # type: ignore[attr-defined]


def test_transcript_template_renders_roles_and_cue() -> None:
    text = TEMPLATES["transcript"].render(
        [
            Turn(Role.SYSTEM, "Be brief."),
            Turn(Role.USER, "Hi"),
            Turn(Role.ASSISTANT, "Hello"),
            Turn(Role.USER, "Bye"),
        ]
    )
    assert text == "Be brief.\n\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"
