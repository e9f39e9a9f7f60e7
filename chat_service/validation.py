"""Request checks and page tokens of the chat API; every error names its field."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import UTC, datetime

from chat_service.domain import ChatCursor, HistoryStrategy
from chat_service.inference import SamplingOptions
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.common import sampling as ranges
from chatmesh.common.errors import InvalidArgument

MAX_CONTENT_CHARS = 32_000
MAX_TITLE_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 8_000
MAX_REQUEST_ID_CHARS = 128
DEFAULT_CHATS_PAGE, MAX_CHATS_PAGE = 20, 100
DEFAULT_MESSAGES_PAGE, MAX_MESSAGES_PAGE = 50, 200
MAX_SEQ = 2**63 - 1
"""Message positions are BIGINT (INTEGER on SQLite): a page token past it cannot come from this API."""
MAX_PAGE_TOKEN_CHARS = 256
"""Far more than any token this API writes (under 100 characters)."""
_SEQ_DIGITS = re.compile(r"[0-9]{1,19}")

STRATEGIES = {
    pb.HISTORY_STRATEGY_FULL: HistoryStrategy.FULL,
    pb.HISTORY_STRATEGY_WINDOW: HistoryStrategy.WINDOW,
    pb.HISTORY_STRATEGY_SUMMARY: HistoryStrategy.SUMMARY,
}


def chat_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument("chat_id", f"must be a chat id (a UUID), got {value[:64]!r}") from None


def content(value: str, field: str = "content") -> str:
    if not value.strip():
        raise InvalidArgument(field, "must not be empty")
    return bounded_text(value, field, MAX_CONTENT_CHARS)


def bounded_text(value: str, field: str, limit: int) -> str:
    """`value` if it fits in `limit` characters and holds no NUL character.

    PostgreSQL text cannot hold NUL (SQLite can): refused here, before anything is written, so both
    databases answer the same INVALID_ARGUMENT rather than one storing it and the other failing."""
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters, got {len(value)}")
    if (nul := value.find("\x00")) >= 0:
        raise InvalidArgument(field, f"must not contain the NUL character (U+0000); found at index {nul}")
    return value


def strategy(value: int) -> HistoryStrategy | None:
    """None for UNSPECIFIED (use the default)."""
    if value == pb.HISTORY_STRATEGY_UNSPECIFIED:
        return None
    try:
        return STRATEGIES[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(
            "history_strategy", f"unknown strategy {value}; use HISTORY_STRATEGY_FULL, _WINDOW or _SUMMARY"
        ) from None


def job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument("job_id", f"must be a UUID, got {value[:64]!r}") from None


def request_id(value: str) -> str | None:
    return bounded_text(value, "request_id", MAX_REQUEST_ID_CHARS) or None


def sampling(
    request: pb.CreateChatRequest | pb.CompleteRequest | pb.SubmitCompletionRequest, context_length: int
) -> SamplingOptions:
    return sampling_options(
        request.max_tokens if request.HasField("max_tokens") else None,
        request.temperature if request.HasField("temperature") else None,
        request.top_p if request.HasField("top_p") else None,
        request.seed if request.HasField("seed") else None,
        context_length,
    )


def sampling_options(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    context_length: int,
    max_tokens_field: str = "max_tokens",
) -> SamplingOptions:
    """Checked sampling values (None: the engine's default); `max_tokens_field` names it in errors."""
    return SamplingOptions(
        None if max_tokens is None else ranges.check_max_tokens(max_tokens, context_length, max_tokens_field),
        None if temperature is None else ranges.check_temperature(temperature),
        None if top_p is None else ranges.check_top_p(top_p),
        None if seed is None else ranges.check_seed(seed),
    )


def page_size(value: int, default: int, limit: int) -> int:
    if value < 0 or value > limit:
        raise InvalidArgument("page_size", f"must be between 1 and {limit} (0 means {default}), got {value}")
    return value or default


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(token: str) -> str:
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidArgument("page_token", "is not a token returned by this API")
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token", "is not a token returned by this API") from None


def chat_cursor_token(cursor: ChatCursor) -> str:
    return _encode(f"c|{cursor.last_activity_at.isoformat()}|{cursor.chat_id}")


def chat_cursor(token: str) -> ChatCursor | None:
    """The ListChats position `token` holds (None for the first page); anything a ListChats page did not
    hand out is INVALID_ARGUMENT on page_token, never an error further down (a naive time, which the store
    cannot compare with its UTC times, included)."""
    if not token:
        return None
    kind, _, rest = _decode(token).partition("|")
    when, _, chat = rest.partition("|")
    try:
        if kind != "c":
            raise ValueError(kind)
        last_activity_at = datetime.fromisoformat(when)
        if last_activity_at.utcoffset() is None:
            raise ValueError(when)
        # Here, not in the store: an offset can carry a time just inside year 1 or 9999 out of range.
        return ChatCursor(last_activity_at.astimezone(UTC), uuid.UUID(chat))
    except (ValueError, OverflowError):
        raise InvalidArgument("page_token", "is not a token returned by ListChats") from None


def message_cursor_token(seq: int) -> str:
    return _encode(f"m|{seq}")


def message_cursor(token: str) -> int | None:
    """The GetMessages position `token` holds (None for the first page): ASCII digits up to BIGINT's
    largest value (`str.isdigit` and `int` also take other scripts' digits, '²' among them)."""
    if not token:
        return None
    kind, _, seq = _decode(token).partition("|")
    if kind != "m" or not _SEQ_DIGITS.fullmatch(seq) or int(seq) > MAX_SEQ:
        raise InvalidArgument("page_token", "is not a token returned by GetMessages")
    return int(seq)
