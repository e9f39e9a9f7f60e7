"""Values of accounting: who calls (`Caller`), what a generation used (`UsageEntry`), budgets and API keys.
Independent of protobuf and of the database."""

from __future__ import annotations

import calendar
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum


class KeyScope(StrEnum):
    """What an API key may be used for."""

    CHAT = "chat"
    OPENAI = "openai"
    USAGE = "usage"


ALL_KEY_SCOPES = frozenset(KeyScope)
"""A key made with no scopes may do all of these (never manage keys, never administer)."""


class UsageKind(StrEnum):
    """What a generation was for."""

    CHAT = "chat"
    """A chat's completion, streamed to the caller (REST or gRPC)."""
    JOB = "job"
    """A chat's completion run as an asynchronous job."""
    OPENAI = "openai"
    """A stateless completion of the OpenAI-compatible API."""
    SUMMARY = "summary"
    """A summary of a chat's older turns (the summary history strategy), charged to the chat's owner."""


class UsageOutcome(StrEnum):
    """How a generation ended."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    CACHED = "cached"
    """Served from the semantic cache: no engine tokens."""
    FAILED = "failed"


class BudgetScope(StrEnum):
    USER = "user"
    GROUP = "group"


class BudgetPeriod(StrEnum):
    DAY = "day"
    MONTH = "month"

    def start(self, now: datetime) -> date:
        """The first day of the period that holds `now` (UTC)."""
        today = now.astimezone(UTC).date()
        return today if self is BudgetPeriod.DAY else today.replace(day=1)

    def reset_at(self, now: datetime) -> datetime:
        """When the period that holds `now` ends (00:00 UTC of the next day or month)."""
        start = self.start(now)
        if self is BudgetPeriod.DAY:
            end = start + timedelta(days=1)
        else:
            end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
        return datetime(end.year, end.month, end.day, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of an RPC: the token's subject, its group claim, whether they are an
    admin, and, when the bearer is an API key, the key's id and scopes (None: a sign-in token)."""

    user_id: str
    group: str = ""
    admin: bool = False
    key_id: uuid.UUID | None = None
    scopes: frozenset[KeyScope] = field(default_factory=frozenset)

    @property
    def by_key(self) -> bool:
        return self.key_id is not None


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """What one generation used, recorded once (with the reply, where there is one).

    Budgets are charged `prompt_tokens + completion_tokens`; `cached_tokens` (the tokens of an answer
    served from the semantic cache, which no engine generated) are recorded and charged nothing."""

    user_id: str
    kind: UsageKind
    model: str
    prompt_tokens: int
    completion_tokens: int
    outcome: UsageOutcome
    cached_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float | None = None
    chat_id: uuid.UUID | None = None
    message_id: uuid.UUID | None = None
    """The reply's id, set by the store that stores the reply with it (None for stateless answers)."""
    request_key: str | None = None
    """Unique per generation where the caller can tell (a retry carries the same): a second record with
    the same key is ignored. None: always recorded."""

    @property
    def charged_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """A limit on the tokens of one user or group per period; `tokens` 0 is no limit. `subject` "*" is
    the default from settings (for every user or every group)."""

    scope: BudgetScope
    subject: str
    period: BudgetPeriod
    tokens: int
    overridden: bool = False


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A budget with its use in the current period."""

    limit: BudgetLimit
    used_tokens: int
    reset_at: datetime

    @property
    def remaining_tokens(self) -> int | None:
        """None when there is no limit."""
        if self.limit.tokens <= 0:
            return None
        return max(0, self.limit.tokens - self.used_tokens)

    @property
    def exhausted(self) -> bool:
        return self.limit.tokens > 0 and self.used_tokens >= self.limit.tokens


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Tokens of one UTC day and model (and, in the team view, user and group)."""

    day: date
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    requests: int
    user_id: str = ""
    group: str = ""


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A stored API key: never its secret, only `secret_hash` (SHA-256 hex of the bearer string)."""

    id: uuid.UUID
    user_id: str
    group: str
    name: str
    scopes: frozenset[KeyScope]
    prefix: str
    secret_hash: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)
