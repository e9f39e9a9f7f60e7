"""The `Ledger` over a small in-memory `AccountStore` and a clock the test sets: budget periods and their
resets (December into January included), defaults and overrides, the most constraining budget, what a
user over budget is told, users without a group, and the token metrics' bounded group label."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from prometheus_client import CollectorRegistry

from chat_service.accounting.identity import _current_caller
from chat_service.accounting.ledger import (
    BudgetDefaults,
    BudgetExhausted,
    Ledger,
    describe_exhausted,
    most_constraining,
)
from chat_service.accounting.store import BudgetUse
from chat_service.accounting.values import (
    BudgetLimit,
    BudgetPeriod,
    BudgetScope,
    BudgetStatus,
    Caller,
    UsageEntry,
    UsageKind,
    UsageOutcome,
    UsageRow,
)
from chat_service.metrics import ChatMetrics
from chatmesh.common.errors import ResourceExhausted

USER, OTHER = BudgetScope.USER, BudgetScope.GROUP
DAY, MONTH = BudgetPeriod.DAY, BudgetPeriod.MONTH


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class FakeAccountStore:
    """The `AccountStore` contract in memory (the usage and budget half): records carry the group last
    noted and the time they were made; a period's use is the sum of the records made in it."""

    clock: Clock
    members: dict[str, str] = field(default_factory=dict)
    records: list[tuple[UsageEntry, str, datetime]] = field(default_factory=list)
    overrides: dict[tuple[BudgetScope, str, BudgetPeriod], int] = field(default_factory=dict)

    async def note_member(self, user_id: str, group: str) -> None:
        self.members[user_id] = group

    async def member_group(self, user_id: str) -> str:
        return self.members.get(user_id, "")

    async def record_usage(self, entry: UsageEntry) -> bool:
        if entry.request_key is not None and any(
            (e.user_id, e.request_key) == (entry.user_id, entry.request_key) for e, _, _ in self.records
        ):
            return False
        self.records.append((entry, self.members.get(entry.user_id, ""), self.clock()))
        return True

    async def budget_use(self, user_id: str, group: str, now: datetime) -> BudgetUse:
        used: dict[tuple[BudgetScope, BudgetPeriod], int] = {}
        overrides: dict[tuple[BudgetScope, BudgetPeriod], int] = {}
        for scope, subject in ((USER, user_id), (OTHER, group)):
            if not subject:
                continue
            for period in BudgetPeriod:
                tokens = sum(
                    entry.charged_tokens
                    for entry, charged_group, made in self.records
                    if (entry.user_id if scope is USER else charged_group) == subject
                    and period.start(made) == period.start(now)
                )
                if tokens:
                    used[(scope, period)] = tokens
                if (scope, subject, period) in self.overrides:
                    overrides[(scope, period)] = self.overrides[(scope, subject, period)]
        return BudgetUse(used=used, overrides=overrides)

    async def usage_rows(
        self, since: date, *, user_id: str | None = None, group: str | None = None, by_user: bool = False
    ) -> Sequence[UsageRow]:
        raise NotImplementedError

    async def budget_overrides(self) -> Sequence[BudgetLimit]:
        return [
            BudgetLimit(scope, subject, period, tokens, overridden=True)
            for (scope, subject, period), tokens in self.overrides.items()
        ]

    async def set_budget(self, limit: BudgetLimit) -> None:
        self.overrides[(limit.scope, limit.subject, limit.period)] = limit.tokens

    async def clear_budget(self, scope: BudgetScope, subject: str, period: BudgetPeriod) -> None:
        self.overrides.pop((scope, subject, period), None)


@dataclass
class Books:
    clock: Clock
    store: FakeAccountStore
    registry: CollectorRegistry
    ledger: Ledger

    async def use(self, user: str, tokens: int, model: str = "m", cached: int = 0) -> None:
        """Record a generation of `tokens` charged tokens (prompt and completion) by `user`."""
        await self.ledger.record(
            UsageEntry(
                user, UsageKind.CHAT, model, tokens // 2, tokens - tokens // 2, UsageOutcome.STOP, cached
            )
        )

    def tokens(self, group: str, kind: str, model: str = "m") -> float:
        value = self.registry.get_sample_value(
            "chatmesh_usage_tokens_total", {"group": group, "gen_ai_request_model": model, "type": kind}
        )
        return value or 0.0

    async def status(self, user: str, scope: BudgetScope, period: BudgetPeriod) -> BudgetStatus:
        [found] = [
            s for s in await self.ledger.statuses(user) if (s.limit.scope, s.limit.period) == (scope, period)
        ]
        return found


def books(
    now: str = "2026-12-08T10:00:00", defaults: BudgetDefaults | None = None, metrics_groups: int = 50
) -> Books:
    clock = Clock(at(now))
    store = FakeAccountStore(clock)
    registry = CollectorRegistry()
    ledger = Ledger(
        store,  # type: ignore[arg-type]  # the usage half of the protocol: the ledger uses no keys
        defaults or BudgetDefaults(),
        metrics=ChatMetrics(registry),
        metrics_groups=metrics_groups,
        clock=clock,
    )
    return Books(clock, store, registry, ledger)


@pytest.fixture(autouse=True)
def no_caller() -> Iterator[None]:
    """Each test runs outside any RPC unless it sets a caller (then only for itself)."""
    token = _current_caller.set(Caller("nobody"))
    yield
    _current_caller.reset(token)


# -- periods --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "period", "start", "reset"),
    [
        ("2026-12-08T10:00:00", DAY, date(2026, 12, 8), at("2026-12-09T00:00:00")),
        ("2026-12-08T10:00:00", MONTH, date(2026, 12, 1), at("2027-01-01T00:00:00")),
        ("2026-12-31T23:59:59", DAY, date(2026, 12, 31), at("2027-01-01T00:00:00")),
        ("2026-12-31T23:59:59", MONTH, date(2026, 12, 1), at("2027-01-01T00:00:00")),
        ("2027-01-01T00:00:00", DAY, date(2027, 1, 1), at("2027-01-02T00:00:00")),
        ("2027-01-01T00:00:00", MONTH, date(2027, 1, 1), at("2027-02-01T00:00:00")),
        ("2028-02-29T12:00:00", DAY, date(2028, 2, 29), at("2028-03-01T00:00:00")),
        ("2028-02-10T12:00:00", MONTH, date(2028, 2, 1), at("2028-03-01T00:00:00")),
        ("2027-02-10T12:00:00", MONTH, date(2027, 2, 1), at("2027-03-01T00:00:00")),
        ("2026-04-30T12:00:00", MONTH, date(2026, 4, 1), at("2026-05-01T00:00:00")),
    ],
)
def test_a_period_starts_and_resets_at_utc_midnight(
    now: str, period: BudgetPeriod, start: date, reset: datetime
) -> None:
    assert period.start(at(now)) == start
    assert period.reset_at(at(now)) == reset


def test_periods_are_utc_whatever_the_zone_of_now() -> None:
    # 22:30 on December 31st two hours west of UTC is already 00:30 on January 1st in UTC.
    late = datetime(2026, 12, 31, 22, 30, tzinfo=timezone(timedelta(hours=-2)))
    assert DAY.start(late) == date(2027, 1, 1) and MONTH.start(late) == date(2027, 1, 1)
    assert DAY.reset_at(late) == at("2027-01-02T00:00:00")
    assert MONTH.reset_at(late) == at("2027-02-01T00:00:00")


async def test_the_day_and_the_month_reset_from_december_into_january() -> None:
    b = books("2026-12-31T23:00:00", BudgetDefaults(user_daily=100, user_monthly=1000))
    await b.use("alice", 100)
    with pytest.raises(BudgetExhausted) as refused:
        await b.ledger.admit("alice")
    assert "resets at 2027-01-01T00:00:00Z" in str(refused.value)
    assert (await b.status("alice", USER, MONTH)).used_tokens == 100

    b.clock.now = at("2027-01-01T00:00:00")
    await b.ledger.admit("alice")
    day, month = await b.status("alice", USER, DAY), await b.status("alice", USER, MONTH)
    assert (day.used_tokens, day.remaining_tokens, day.reset_at) == (0, 100, at("2027-01-02T00:00:00"))
    assert (month.used_tokens, month.remaining_tokens, month.reset_at) == (0, 1000, at("2027-02-01T00:00:00"))


async def test_a_new_day_resets_the_daily_budget_but_not_the_monthly_one() -> None:
    b = books("2026-12-08T10:00:00", BudgetDefaults(user_daily=100, user_monthly=150))
    await b.use("alice", 100)
    b.clock.now = at("2026-12-09T00:00:00")
    await b.ledger.admit("alice")
    await b.use("alice", 50)
    assert (await b.status("alice", USER, DAY)).used_tokens == 50
    with pytest.raises(BudgetExhausted) as refused:
        await b.ledger.admit("alice")
    assert refused.value.status.limit.period is MONTH
    assert str(refused.value) == (
        "your monthly token budget of 150 tokens is used up (150 used); it resets at 2027-01-01T00:00:00Z"
    )


# -- what a user over budget is told ----------------------------------------------------------------------


async def test_the_refusal_names_the_budget_its_use_and_its_reset_with_the_time_to_it_as_retry_delay() -> (
    None
):
    b = books("2026-12-08T18:00:00", BudgetDefaults(user_daily=10))
    await b.use("alice", 12)
    with pytest.raises(ResourceExhausted) as refused:
        await b.ledger.admit("alice")
    assert str(refused.value) == (
        "your daily token budget of 10 tokens is used up (12 used); it resets at 2026-12-09T00:00:00Z"
    )
    assert refused.value.retry_after_s == 6 * 3600
    rejected = b.registry.get_sample_value(
        "chatmesh_budget_rejections_total", {"scope": "user", "period": "day"}
    )
    assert rejected == 1


async def test_a_groups_budget_names_the_group() -> None:
    b = books("2026-12-08T10:00:00", BudgetDefaults(group_monthly=100))
    for user in ("alice", "bob"):
        await b.store.note_member(user, "research")
    await b.use("alice", 60)
    await b.use("bob", 40)
    with pytest.raises(BudgetExhausted) as refused:
        await b.ledger.admit("alice")
    assert str(refused.value) == (
        "your group's (research) monthly token budget of 100 tokens is used up (100 used);"
        " it resets at 2027-01-01T00:00:00Z"
    )
    await b.ledger.admit("dave")  # in no group: the group's budget is not his


def test_describe_exhausted_at_a_month_end() -> None:
    status = BudgetStatus(BudgetLimit(USER, "alice", MONTH, 5000), 5003, at("2027-01-01T00:00:00"))
    assert describe_exhausted(status) == (
        "your monthly token budget of 5000 tokens is used up (5003 used); it resets at 2027-01-01T00:00:00Z"
    )


async def test_when_several_budgets_are_used_up_the_one_that_resets_last_is_named() -> None:
    b = books("2026-12-08T10:00:00", BudgetDefaults(user_daily=10, user_monthly=10))
    await b.use("alice", 10)
    with pytest.raises(BudgetExhausted) as refused:
        await b.ledger.admit("alice")
    assert refused.value.status.limit.period is MONTH
    assert refused.value.retry_after_s == (at("2027-01-01T00:00:00") - b.clock.now).total_seconds()


# -- the most constraining budget (the x-ratelimit-*-tokens headers) ---------------------------------------


async def test_the_most_constraining_budget_is_the_one_with_fewest_tokens_left() -> None:
    b = books("2026-12-08T10:00:00", BudgetDefaults(user_daily=100, user_monthly=1000, group_daily=50))
    await b.store.note_member("alice", "research")
    await b.use("alice", 40)
    worst = await b.ledger.header_status("alice")
    assert worst is not None
    assert (worst.limit.scope, worst.limit.subject, worst.limit.period) == (OTHER, "research", DAY)
    assert (worst.remaining_tokens, worst.reset_at) == (10, at("2026-12-09T00:00:00"))


def test_ties_go_to_the_budget_that_resets_last_and_no_limits_are_none() -> None:
    day = BudgetStatus(BudgetLimit(USER, "a", DAY, 100), 90, at("2026-12-09T00:00:00"))
    month = BudgetStatus(BudgetLimit(USER, "a", MONTH, 1000), 990, at("2027-01-01T00:00:00"))
    unlimited = BudgetStatus(BudgetLimit(OTHER, "g", DAY, 0), 10_000, at("2026-12-09T00:00:00"))
    assert most_constraining([day, month, unlimited]) is month
    assert most_constraining([unlimited]) is None
    assert most_constraining([]) is None
    assert unlimited.remaining_tokens is None and not unlimited.exhausted


async def test_without_any_limit_there_is_no_header_budget_and_everyone_is_admitted() -> None:
    b = books()
    await b.use("alice", 1_000_000)
    await b.ledger.admit("alice")
    assert await b.ledger.header_status("alice") is None


# -- defaults and overrides -------------------------------------------------------------------------------


async def test_an_override_replaces_the_default_for_its_subject_only_until_cleared() -> None:
    b = books(defaults=BudgetDefaults(user_daily=100))
    await b.use("alice", 20)
    await b.use("bob", 20)
    set_to = await b.ledger.set_budget(BudgetLimit(USER, "alice", DAY, 20, overridden=True))
    assert (set_to.limit.tokens, set_to.used_tokens, set_to.limit.overridden) == (20, 20, True)

    with pytest.raises(BudgetExhausted):
        await b.ledger.admit("alice")
    await b.ledger.admit("bob")
    alice, bob = await b.status("alice", USER, DAY), await b.status("bob", USER, DAY)
    assert (alice.limit.tokens, alice.limit.overridden) == (20, True)
    assert (bob.limit.tokens, bob.limit.overridden, bob.remaining_tokens) == (100, False, 80)

    cleared = await b.ledger.clear_budget(USER, "alice", DAY)
    assert (cleared.limit.tokens, cleared.limit.overridden) == (100, False)
    await b.ledger.admit("alice")
    assert (await b.status("alice", USER, DAY)).limit.tokens == 100


async def test_an_override_of_zero_lifts_the_default_limit() -> None:
    b = books(defaults=BudgetDefaults(user_daily=10))
    await b.use("alice", 50)
    await b.ledger.set_budget(BudgetLimit(USER, "alice", DAY, 0, overridden=True))
    await b.ledger.admit("alice")
    assert (await b.status("alice", USER, DAY)).remaining_tokens is None


async def test_budgets_lists_the_four_defaults_and_every_override_with_its_use() -> None:
    b = books(defaults=BudgetDefaults(user_daily=100, group_monthly=5000))
    await b.store.note_member("alice", "research")
    await b.use("alice", 30)
    await b.ledger.set_budget(BudgetLimit(USER, "alice", DAY, 50, overridden=True))
    await b.ledger.set_budget(BudgetLimit(OTHER, "research", MONTH, 70, overridden=True))
    listed = {
        (s.limit.scope, s.limit.subject, s.limit.period): (s.limit.tokens, s.used_tokens, s.limit.overridden)
        for s in await b.ledger.budgets()
    }
    assert listed == {
        (USER, "*", DAY): (100, 0, False),
        (USER, "*", MONTH): (0, 0, False),
        (OTHER, "*", DAY): (0, 0, False),
        (OTHER, "*", MONTH): (5000, 0, False),
        (USER, "alice", DAY): (50, 30, True),
        (OTHER, "research", MONTH): (70, 30, True),
    }


# -- groups ----------------------------------------------------------------------------------------------


async def test_a_user_in_no_group_has_no_group_budgets() -> None:
    b = books(defaults=BudgetDefaults(group_daily=1, group_monthly=1))
    await b.use("loner", 10)
    statuses = await b.ledger.statuses("loner")
    assert {(s.limit.scope, s.limit.period) for s in statuses} == {(USER, DAY), (USER, MONTH)}
    await b.ledger.admit("loner")


async def test_the_callers_own_group_claim_is_the_group_charged() -> None:
    b = books(defaults=BudgetDefaults(group_daily=100))
    await b.store.note_member("alice", "old-team")
    _current_caller.set(Caller("alice", group="new-team"))
    statuses = await b.ledger.statuses("alice")
    assert {s.limit.subject for s in statuses if s.limit.scope is OTHER} == {"new-team"}
    # Another user's group (a job's worker charging its submitter) comes from the store.
    await b.store.note_member("bob", "ops")
    assert await b.ledger.group_of("bob") == "ops"


# -- usage records and metrics ---------------------------------------------------------------------------


async def test_a_record_with_a_request_key_already_recorded_counts_nothing() -> None:
    b = books(defaults=BudgetDefaults(user_daily=100))
    entry = UsageEntry("alice", UsageKind.OPENAI, "m", 3, 4, UsageOutcome.STOP, request_key="r1")
    await b.ledger.record(entry)
    await b.ledger.record(entry)
    assert len(b.store.records) == 1
    assert (await b.status("alice", USER, DAY)).used_tokens == 7
    assert (b.tokens("none", "prompt"), b.tokens("none", "completion")) == (3, 4)


async def test_cached_tokens_are_counted_in_the_metrics_and_charged_nothing() -> None:
    b = books(defaults=BudgetDefaults(user_daily=100))
    await b.ledger.record(
        UsageEntry("alice", UsageKind.CHAT, "m", 0, 0, UsageOutcome.CACHED, cached_tokens=9)
    )
    assert (await b.status("alice", USER, DAY)).used_tokens == 0
    assert (b.tokens("none", "cached"), b.tokens("none", "completion")) == (9, 0)


async def test_the_metrics_group_label_is_bounded_the_rest_are_other() -> None:
    b = books(metrics_groups=2)
    for user, group in (("a1", "alpha"), ("b1", "beta"), ("c1", "gamma"), ("a2", "alpha"), ("n1", "")):
        await b.store.note_member(user, group)
    for user in ("a1", "b1", "c1", "a2", "n1"):
        await b.use(user, 10)
    assert b.tokens("alpha", "completion") == 10  # two records of 5 completion tokens
    assert b.tokens("beta", "completion") == 5
    assert b.tokens("gamma", "completion") == 0
    assert b.tokens("other", "completion") == 5
    assert b.tokens("none", "completion") == 5, "no group is `none`, not a third group"
