"""Page tokens fuzzed: whatever a client sends as `page_token`, the parsers give back a cursor the store
can use, or InvalidArgument naming page_token; never another exception (which the service answers 500).

Besides arbitrary strings, the strategies write base64 of crafted payloads: the tokens' own shapes
(`c|<time>|<uuid>`, `m|<seq>`) with every part replaced by text, digits of other scripts, numbers past
BIGINT, naive and far-off times.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chat_service import validation as check
from chat_service.domain import ChatCursor
from chatmesh.common.errors import InvalidArgument


def b64(payload: str) -> str:
    """A token as the API writes one: URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(payload.encode("utf-8", "surrogatepass")).decode().rstrip("=")


digits = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=25),
    st.sampled_from(["²", "٣", "9" * 19, str(2**63), str(2**63 - 1), "0" * 30 + "1", " 1", "1\n", "+1"]),
)
offsets = st.one_of(
    st.none(),
    st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)).map(
        timezone
    ),
)
times = st.one_of(
    st.datetimes(timezones=offsets).map(datetime.isoformat),
    st.datetimes().map(lambda when: when.isoformat()),  # naive
    st.sampled_from(["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01", "2024-01-01", ""]),
    st.text(max_size=40),
)
chat_ids = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: u.hex), st.text(max_size=40))
chat_payloads = st.builds(
    lambda kind, when, chat, tail: f"{kind}|{when}|{chat}{tail}",
    st.sampled_from(["c", "m", "C", ""]),
    times,
    chat_ids,
    st.sampled_from(["", "|", "|x"]),
)
message_payloads = st.builds(lambda kind, seq: f"{kind}|{seq}", st.sampled_from(["m", "c", "M", ""]), digits)
tokens = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=200).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
    st.text(max_size=100).map(b64),
    chat_payloads.map(b64),
    message_payloads.map(b64),
)


# No per-example deadline: the parsers take microseconds, and a machine busy with other tests must not
# turn a slow example into a failure.
fuzz = settings(deadline=None)


def assert_page_token_error(error: InvalidArgument) -> None:
    assert error.field == "page_token", error


@fuzz
@given(tokens)
@example(b64("c|2024-05-01T12:00:00|00000000-0000-0000-0000-000000000001"))  # naive time
@example(b64("c|0001-01-01T00:00:00+05:00|00000000-0000-0000-0000-000000000001"))  # before year 1 in UTC
def test_chat_cursor_is_a_usable_cursor_or_invalid_argument(token: str) -> None:
    try:
        cursor = check.chat_cursor(token)
    except InvalidArgument as error:
        assert_page_token_error(error)
        return
    if cursor is None:
        assert token == ""
        return
    # What the store compares against its UTC times: aware, in UTC.
    assert cursor.last_activity_at.utcoffset() == timedelta(0)
    assert isinstance(cursor.chat_id, uuid.UUID)


@fuzz
@given(tokens)
@example(b64("m|²"))  # str.isdigit says yes, int() says no
@example(b64(f"m|{2**63}"))  # past BIGINT
@example(b64("m|٣"))  # a digit of another script: int() takes it, the API never writes it
def test_message_cursor_is_a_usable_cursor_or_invalid_argument(token: str) -> None:
    try:
        seq = check.message_cursor(token)
    except InvalidArgument as error:
        assert_page_token_error(error)
        return
    if seq is None:
        assert token == ""
        return
    assert 0 <= seq <= 2**63 - 1


@fuzz
@given(st.datetimes(timezones=offsets.filter(lambda tz: tz is not None)), st.uuids())
def test_every_chat_token_the_api_writes_reads_back(when: datetime, chat_id: uuid.UUID) -> None:
    try:
        utc = when.astimezone(UTC)
    except OverflowError:
        return  # not a time the store can hold, so never one a page ends on
    token = check.chat_cursor_token(ChatCursor(utc, chat_id))
    assert check.chat_cursor(token) == ChatCursor(utc, chat_id)


@fuzz
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_every_message_token_the_api_writes_reads_back(seq: int) -> None:
    assert check.message_cursor(check.message_cursor_token(seq)) == seq


@pytest.mark.parametrize("length", [check.MAX_PAGE_TOKEN_CHARS + 1, 100_000])
def test_an_overlong_token_is_refused_before_decoding(length: int) -> None:
    with pytest.raises(InvalidArgument) as refused:
        check.message_cursor("A" * length)
    assert_page_token_error(refused.value)
