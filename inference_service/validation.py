"""Checks on Generate/CountTokens requests, turning protobuf messages into validated domain values."""

from __future__ import annotations

from collections.abc import Sequence

from chatmesh.common import sampling as ranges
from chatmesh.common.errors import InvalidArgument
from chatmesh.inference.v1 import inference_pb2 as pb
from inference_service.backends.base import ModelInfo, Prompt, Sampling
from inference_service.prompt import Role, Turn

_ROLES = {pb.ROLE_SYSTEM: Role.SYSTEM, pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT}

MAX_MESSAGES = 4096


def parse_turns(messages: Sequence[pb.Message]) -> list[Turn]:
    """Validate the message list; every error names the offending field."""
    items = list(messages)
    if not items:
        raise InvalidArgument("messages", "at least one message is required")
    if len(items) > MAX_MESSAGES:
        raise InvalidArgument("messages", f"at most {MAX_MESSAGES} messages are allowed, got {len(items)}")
    turns = []
    for index, message in enumerate(items):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidArgument(
                f"messages[{index}].role",
                f"unknown role {message.role}; use ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
            )
        turns.append(Turn(role=role, content=message.content))
    return turns


def parse_sampling(
    params: pb.SamplingParams,
    prompt: Prompt,
    info: ModelInfo,
    default_max_tokens: int,
    template_stop: tuple[str, ...],
    max_stop_sequences: int,
    max_stop_chars: int,
) -> Sampling:
    """Validate sampling knobs and check that the prompt plus max_tokens fits the context."""
    context = info.context_length
    if prompt.token_count >= context:
        raise InvalidArgument(
            "messages",
            f"the prompt is {prompt.token_count} tokens but the model's context is {context} tokens;"
            " shorten the conversation",
        )
    room = context - prompt.token_count
    if params.HasField("max_tokens"):
        max_tokens = ranges.check_max_tokens(params.max_tokens, context, "sampling.max_tokens")
        if max_tokens > room:
            raise InvalidArgument(
                "sampling.max_tokens",
                f"the prompt is {prompt.token_count} tokens, so at most {room} more fit the model's"
                f" {context}-token context, got {max_tokens}",
            )
    else:
        max_tokens = min(default_max_tokens, room)

    temperature = params.temperature if params.HasField("temperature") else 0.7
    top_p = params.top_p if params.HasField("top_p") else 0.95
    return Sampling(
        max_tokens=max_tokens,
        temperature=ranges.check_temperature(temperature, "sampling.temperature"),
        top_p=ranges.check_top_p(top_p, "sampling.top_p"),
        stop=(
            *template_stop,
            *ranges.check_stop(params.stop, max_stop_sequences, max_stop_chars, "sampling.stop"),
        ),
        seed=params.seed if params.HasField("seed") else None,
    )
