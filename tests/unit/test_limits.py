"""The retry hint of the per-user completion limit: when one of the user's running completions is
expected to end, from how long that user's completions took (everyone's, for a user not seen yet)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from chat_service.limits import MAX_RETRY_AFTER_S, MIN_RETRY_AFTER_S, CompletionDurations


def test_a_user_with_long_completions_is_told_to_wait_longer_than_one_with_short_ones() -> None:
    durations = CompletionDurations(initial_s=5.0)
    for _ in range(20):
        durations.add("flooder", 30.0)
        durations.add("asker", 1.0)
    just_now = datetime.now(UTC)
    assert durations.retry_after_s("flooder", just_now) > 25
    assert durations.retry_after_s("asker", just_now) < 2
    # Someone not seen yet gets everyone's mean.
    assert abs(durations.retry_after_s("newcomer", just_now) - durations.mean_s()) < 0.1


def test_the_hint_counts_from_when_the_oldest_started_within_bounds() -> None:
    durations = CompletionDurations(initial_s=10.0)
    now = datetime.now(UTC)
    assert 5.5 < durations.retry_after_s("user", now - timedelta(seconds=4), active=2) < 6.5, "oldest due"
    # Overdue: one of the 2 ends every 10 / 2 seconds on average.
    assert 4.9 < durations.retry_after_s("user", now - timedelta(seconds=60), active=2) < 5.1
    durations.add("quick", 0.1)
    assert durations.retry_after_s("quick", now, active=2) == MIN_RETRY_AFTER_S
    durations.add("slow", 1000.0)
    assert durations.retry_after_s("slow", now) == MAX_RETRY_AFTER_S


def test_only_the_most_recent_users_are_remembered() -> None:
    durations = CompletionDurations(initial_s=5.0, weight=0.5, max_users=2)
    durations.add("first", 40.0)
    durations.add("second", 1.0)
    durations.add("third", 1.0)
    assert durations.mean_s("first") == durations.mean_s(), "forgotten: everyone's mean"
    assert durations.mean_s("third") == 1.0
