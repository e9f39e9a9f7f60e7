"""Payload values, filters and request validation of the vector service: pure conversions and checks."""

from __future__ import annotations

import math
import uuid

import pytest

from chatmesh.common.errors import InvalidArgument
from chatmesh.vectors.v1 import vectors_pb2 as pb
from chatmesh.vectors.values import (
    Condition,
    Match,
    PayloadValue,
    Range,
    conditions,
    filter_from_pb,
    filter_to_pb,
    payload_from_pb,
    payload_to_pb,
)
from embedding_service.vector_index import PayloadKind
from embedding_service.vector_servicer import (
    DEFAULT_LIMIT,
    payload_kinds,
    validate_collection,
    validate_filter,
    validate_limit,
    validate_payload,
    validate_point_id,
)


def test_payload_values_keep_their_type_through_protobuf() -> None:
    payload: dict[str, PayloadValue] = {
        "user_id": "alice",
        "expires_at": 1_900_000_000,
        "ratio": 0.25,
        "global": False,
        "n": 0,
    }
    wire = pb.Value.FromString  # a real round trip through bytes, not just the message objects
    back = payload_from_pb(
        {key: wire(value.SerializeToString()) for key, value in payload_to_pb(payload).items()}, "payload"
    )
    assert back == payload
    # bool is an int to Python; it must stay a bool (and 0 an int) to the index.
    assert type(back["global"]) is bool and type(back["n"]) is int and type(back["ratio"]) is float


def test_a_value_of_another_type_is_refused_on_the_client() -> None:
    with pytest.raises(TypeError, match="str, int, float or bool"):
        payload_to_pb({"tags": ["a", "b"]})  # type: ignore[dict-item]


def test_a_filter_from_a_dict_or_conditions_round_trips() -> None:
    spec: dict[str, Match] = {"user_id": "alice", "n": 3, "on": True, "expires_at": Range(gt=10.5, lte=20)}
    where = conditions(spec)
    assert where == [
        Condition("user_id", "alice"),
        Condition("n", 3),
        Condition("on", True),
        Condition("expires_at", Range(gt=10.5, lte=20)),
    ]
    wire = pb.Filter.FromString(filter_to_pb(where).SerializeToString())
    assert [c.WhichOneof("match") for c in wire.must] == ["equals_text", "equals_int", "equals_bool", "range"]
    assert filter_from_pb(wire, "filter") == where
    assert not wire.must[3].range.HasField("gte")  # unset bounds stay unset, not 0


def test_an_exact_float_condition_is_refused_on_the_client() -> None:
    with pytest.raises(TypeError, match="Range"):
        filter_to_pb([Condition("ratio", 0.5)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("condition", "field", "problem"),
    [
        (pb.Condition(key="k"), "filter.must[0]", "no match"),
        (pb.Condition(key="k", range=pb.Range()), "filter.must[0].range", "no bound"),
        (pb.Condition(key="k", range=pb.Range(gt=math.nan)), "filter.must[0].range.gt", "finite"),
        (pb.Condition(key="k", range=pb.Range(lt=math.inf)), "filter.must[0].range.lt", "finite"),
        (pb.Condition(key="a.b", equals_int=1), "filter.must[0].key", "not a payload key"),
        (pb.Condition(key="", equals_int=1), "filter.must[0].key", "not a payload key"),
    ],
    ids=["no-match", "empty-range", "nan", "infinite", "dotted-key", "empty-key"],
)
def test_bad_conditions_name_their_field(condition: pb.Condition, field: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_filter(pb.Filter(must=[condition]), "filter")
    assert info.value.field == field
    assert problem in info.value.problem


def test_too_many_conditions_are_refused() -> None:
    must = [pb.Condition(key=f"k{i}", equals_int=i) for i in range(17)]
    with pytest.raises(InvalidArgument, match="at most 16"):
        validate_filter(pb.Filter(must=must), "filter")


@pytest.mark.parametrize(("limit", "expected"), [(0, DEFAULT_LIMIT), (1, 1), (100, 100)])
def test_limits_in_range(limit: int, expected: int) -> None:
    assert validate_limit(limit) == expected


@pytest.mark.parametrize("limit", [-1, 101])
def test_limits_out_of_range(limit: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_limit(limit)
    assert info.value.field == "limit"


@pytest.mark.parametrize("name", ["cache", "semantic-cache_v2", "A" * 64])
def test_collection_names_accepted(name: str) -> None:
    assert validate_collection(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "a b", "A" * 65, "café"])
def test_collection_names_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_collection(name)
    assert info.value.field == "collection"


def test_point_ids_are_canonical_uuids() -> None:
    point_id = uuid.uuid4()
    assert validate_point_id("id", str(point_id).upper()) == str(point_id)
    with pytest.raises(InvalidArgument, match="not a UUID"):
        validate_point_id("points[0].id", "17")


def test_payload_validation_names_the_entry() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_payload("points[1].payload", {"ratio": pb.Value(double_value=math.nan)})
    assert info.value.field == 'points[1].payload["ratio"]'
    with pytest.raises(InvalidArgument) as info:
        validate_payload("points[0].payload", {"answer": pb.Value(text_value="x" * 65_537)})
    assert "65537 characters" in info.value.problem
    with pytest.raises(InvalidArgument, match="at most 32"):
        validate_payload("p", {f"k{i}": pb.Value(int_value=i) for i in range(33)})


def test_payload_kinds_follow_the_first_value_of_each_key() -> None:
    kinds = payload_kinds([{"user_id": "a", "n": 1}, {"n": 2.5, "on": True, "ratio": 0.5}])
    assert kinds == {
        "user_id": PayloadKind.KEYWORD,
        "n": PayloadKind.INTEGER,
        "on": PayloadKind.BOOL,
        "ratio": PayloadKind.FLOAT,
    }
