"""The x-ratelimit-*-tokens header values, and the trailers of a budget's refusal."""

from __future__ import annotations

from datetime import UTC, datetime

from chat_service.accounting.ledger import BudgetExhausted
from chat_service.accounting.token_headers import duration_text, token_headers
from chat_service.accounting.values import BudgetLimit, BudgetPeriod, BudgetScope, BudgetStatus
from chatmesh.common.grpc_errors import trailing_metadata

NOW = datetime(2026, 12, 8, 18, 30, 0, tzinfo=UTC)


def status(tokens: int, used: int, period: BudgetPeriod = BudgetPeriod.DAY) -> BudgetStatus:
    return BudgetStatus(BudgetLimit(BudgetScope.USER, "ada", period, tokens), used, period.reset_at(NOW))


def test_durations_read_as_openai_writes_them() -> None:
    assert duration_text(0.12) == "120ms"
    assert duration_text(45) == "45s"
    assert duration_text(360) == "6m0s"
    assert duration_text(3723.9) == "1h2m3s"
    # A month's reset is counted in hours, as a duration (no days in the format).
    assert duration_text(23 * 24 * 3600 + 5) == "552h0m5s"


def test_the_headers_show_the_budget_left_and_its_reset() -> None:
    assert token_headers(status(1000, 250), NOW) == [
        ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "750"),
        ("x-ratelimit-reset-tokens", "5h30m0s"),
    ]
    # Used beyond the limit: nothing remains (never a negative count).
    assert dict(token_headers(status(1000, 1034), NOW))["x-ratelimit-remaining-tokens"] == "0"
    # No limit, no headers.
    assert token_headers(status(0, 5000), NOW) == []
    assert token_headers(None, NOW) == []


def test_a_budgets_refusal_carries_retry_after_and_the_token_headers_in_its_trailers() -> None:
    refusal = BudgetExhausted(status(1000, 1034), NOW)
    assert refusal.message == (
        "your daily token budget of 1000 tokens is used up (1034 used); it resets at 2026-12-09T00:00:00Z"
    )
    trailers = dict(trailing_metadata(refusal))
    assert trailers["retry-after"] == str(5 * 3600 + 30 * 60)
    assert trailers["retry-after-ms"] == str((5 * 3600 + 30 * 60) * 1000)
    assert trailers["x-ratelimit-remaining-tokens"] == "0"
    assert trailers["x-ratelimit-reset-tokens"] == "5h30m0s"
