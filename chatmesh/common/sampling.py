"""The ranges a generation's sampling values must lie in, defined once.

The chat service checks them on its own requests and on the OpenAI API's, the inference service on
Generate; both contracts carry the same knobs. Each check raises `InvalidArgument` naming the field as the
caller's contract spells it (`temperature` in the chat API, `sampling.temperature` in the inference API),
with the same problem text everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatmesh.common.errors import InvalidArgument

MAX_TEMPERATURE = 2
"""Temperatures run from 0 (greedy) to this."""
MAX_SEED = 2**64 - 1
"""Seeds are `uint64` in the contracts; the chat store keeps the whole range (see `storage.models.Uint64`)."""


def check_max_tokens(value: int, context_length: int, field: str = "max_tokens") -> int:
    """`value` if it is a reply length the model's `context_length`-token window can hold at all."""
    if not 1 <= value <= context_length:
        raise InvalidArgument(field, f"must be between 1 and {context_length}, got {value}")
    return value


def check_temperature(value: float, field: str = "temperature") -> float:
    """`value` if it is between 0 and `MAX_TEMPERATURE`."""
    if not 0 <= value <= MAX_TEMPERATURE:
        raise InvalidArgument(field, f"must be between 0 and {MAX_TEMPERATURE}, got {value}")
    return value


def check_top_p(value: float, field: str = "top_p") -> float:
    """`value` if it is a nucleus-sampling mass: above 0, at most 1."""
    if not 0 < value <= 1:
        raise InvalidArgument(field, f"must be in (0, 1], got {value}")
    return value


def check_seed(value: int, field: str = "seed") -> int:
    """`value` if it is a `uint64`."""
    if not 0 <= value <= MAX_SEED:
        raise InvalidArgument(field, f"must be between 0 and {MAX_SEED}, got {value}")
    return value


def check_stop(
    stops: Sequence[str], max_sequences: int, max_chars: int, field: str = "stop"
) -> tuple[str, ...]:
    """`stops` if there are at most `max_sequences` of them, each of 1 to `max_chars` characters; errors
    on one of them name it by index (`stop[2]`)."""
    if len(stops) > max_sequences:
        raise InvalidArgument(field, f"at most {max_sequences} stop sequences, got {len(stops)}")
    for index, stop in enumerate(stops):
        if not stop or len(stop) > max_chars:
            raise InvalidArgument(f"{field}[{index}]", f"must be 1 to {max_chars} characters")
    return tuple(stops)
