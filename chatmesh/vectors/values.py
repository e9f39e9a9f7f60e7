"""Payload values and filters of the vector API as plain Python, and their protobuf form.

The service and its clients share these, so a payload or a filter means the same on both sides:
payload values are `str`, `int`, `float` or `bool`; a filter is a conjunction of `Condition`s, each an
exact value (`str`, `int`, `bool`) or a numeric `Range` on one payload key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from chatmesh.common.errors import InvalidArgument
from chatmesh.vectors.v1 import vectors_pb2 as pb

PayloadValue = str | int | float | bool
"""What a payload holds under one key."""

Payload = Mapping[str, PayloadValue]


@dataclass(frozen=True, slots=True)
class Range:
    """Bounds on a numeric payload value; every bound given must hold (at least one is needed)."""

    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None

    def bounds(self) -> dict[str, float]:
        """The bounds that are set, by name (`gt`, `gte`, `lt`, `lte`)."""
        candidates = {"gte": self.gte, "gt": self.gt, "lte": self.lte, "lt": self.lt}
        return {name: value for name, value in candidates.items() if value is not None}


Match = str | int | bool | Range
"""What a condition requires of a value: exactly this string, integer or boolean, or a number within
a `Range`. Exact floats are not offered: compare them with a `Range`."""


@dataclass(frozen=True, slots=True)
class Condition:
    """The payload value under `key` must satisfy `match`; a point without the key never does."""

    key: str
    match: Match


def conditions(where: Mapping[str, Match] | None) -> list[Condition]:
    """The conditions of a filter written as a dict, `{"user_id": "alice", "expires_at": Range(gt=now)}`:
    one per key, all of which must hold (a `Range` takes both bounds of a key)."""
    return [Condition(key, match) for key, match in (where or {}).items()]


def value_to_pb(value: PayloadValue) -> pb.Value:
    """The protobuf form of a payload value (`TypeError` for any other type)."""
    # bool before int: True is an int to Python, but a bool to the index.
    if isinstance(value, bool):
        return pb.Value(bool_value=value)
    if isinstance(value, int):
        return pb.Value(int_value=value)
    if isinstance(value, float):
        return pb.Value(double_value=value)
    if isinstance(value, str):
        return pb.Value(text_value=value)
    raise TypeError(f"a payload value must be str, int, float or bool, not {type(value).__name__}")


def value_from_pb(value: pb.Value, field: str) -> PayloadValue:
    """The Python value of `value`; `InvalidArgument` naming `field` if no kind is set."""
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(
            field, "has no value; set one of text_value, int_value, double_value, bool_value"
        )
    result: PayloadValue = getattr(value, kind)
    return result


def payload_to_pb(payload: Payload) -> dict[str, pb.Value]:
    """The protobuf map of a payload."""
    return {key: value_to_pb(value) for key, value in payload.items()}


def payload_from_pb(payload: Mapping[str, pb.Value], field: str) -> dict[str, PayloadValue]:
    """The Python dict of a protobuf payload map; `field` names it in errors (`points[2].payload`)."""
    return {key: value_from_pb(value, f'{field}["{key}"]') for key, value in payload.items()}


def filter_to_pb(where: Iterable[Condition]) -> pb.Filter:
    """The protobuf form of a conjunction of conditions (`TypeError` for a match of another type)."""
    return pb.Filter(must=[_condition_to_pb(condition) for condition in where])


def _condition_to_pb(condition: Condition) -> pb.Condition:
    match = condition.match
    if isinstance(match, Range):
        return pb.Condition(key=condition.key, range=pb.Range(**match.bounds()))
    if isinstance(match, bool):
        return pb.Condition(key=condition.key, equals_bool=match)
    if isinstance(match, int):
        return pb.Condition(key=condition.key, equals_int=match)
    if isinstance(match, str):
        return pb.Condition(key=condition.key, equals_text=match)
    raise TypeError(
        f"condition on {condition.key!r}: match a str, int, bool or Range, not {type(match).__name__}"
        " (compare floats with a Range)"
    )


def filter_from_pb(where: pb.Filter, field: str) -> list[Condition]:
    """The conditions of a protobuf filter; `InvalidArgument` naming the condition (`filter.must[1]`)
    that has no match or an empty or non-finite range. Keys are checked by the service."""
    result = []
    for i, condition in enumerate(where.must):
        name = f"{field}.must[{i}]"
        kind = condition.WhichOneof("match")
        if kind is None:
            raise InvalidArgument(
                name, "has no match; set one of equals_text, equals_int, equals_bool, range"
            )
        if kind == "range":
            result.append(Condition(condition.key, _range_from_pb(condition.range, f"{name}.range")))
        else:
            result.append(Condition(condition.key, getattr(condition, kind)))
    return result


def _range_from_pb(bounds: pb.Range, field: str) -> Range:
    values = {name: getattr(bounds, name) for name in ("gte", "gt", "lte", "lt") if bounds.HasField(name)}
    if not values:
        raise InvalidArgument(field, "has no bound; set at least one of gte, gt, lte, lt")
    for name, value in values.items():
        if not math.isfinite(value):
            raise InvalidArgument(f"{field}.{name}", f"must be a finite number, not {value}")
    return Range(**values)
