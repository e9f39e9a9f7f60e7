"""The `x-ratelimit-*-tokens` header values of a budget, as OpenAI writes them."""

from __future__ import annotations

from datetime import datetime

from chat_service.accounting.values import BudgetStatus

LIMIT_TOKENS = "x-ratelimit-limit-tokens"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
RESET_TOKENS = "x-ratelimit-reset-tokens"


def duration_text(seconds: float) -> str:
    """A duration as OpenAI writes its resets: `1h2m3s`, `6m0s`, `45s`, `120ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def token_headers(status: BudgetStatus | None, now: datetime) -> list[tuple[str, str]]:
    """The three headers for `status` (none for no limit)."""
    if status is None or status.remaining_tokens is None:
        return []
    return [
        (LIMIT_TOKENS, str(status.limit.tokens)),
        (REMAINING_TOKENS, str(status.remaining_tokens)),
        (RESET_TOKENS, duration_text((status.reset_at - now).total_seconds())),
    ]
