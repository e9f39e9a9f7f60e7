"""Budgets are checked before anything is stored: a chat completion and a job submission of a user over
budget are refused with the budget's message and leave nothing behind; usage of the user's replies is
recorded with them, once."""

from __future__ import annotations

from contextlib import aclosing

import pytest

from chat_service.accounting.ledger import BudgetDefaults, BudgetExhausted, Ledger
from chat_service.accounting.values import UsageKind, UsageOutcome
from chat_service.conversations import Conversations, Finished
from chat_service.domain import HistoryStrategy
from chat_service.history import HistoryBuilder, SummaryPolicy
from chat_service.inference import SamplingOptions
from chat_service.jobs.service import Jobs
from tests.support.fakes import FakeEngine, MemoryConversationStore, MemoryDatabase, MemoryJobStore
from tests.unit.test_conversations import RecordingQueue
from tests.unit.test_ledger import Clock, FakeAccountStore, at, no_caller  # noqa: F401  (autouse fixture)

SAMPLING = SamplingOptions(max_tokens=16)


def accounted(store: MemoryConversationStore, engine: FakeEngine, ledger: Ledger) -> Conversations:
    return Conversations(
        store,
        engine,
        HistoryBuilder(store, engine, SummaryPolicy(), ledger),
        engine.served,
        HistoryStrategy.FULL,
        replica_id="replica-a",
        lease_s=60.0,
        ledger=ledger,
    )


async def test_a_user_over_budget_gets_no_completion_and_no_job_and_nothing_is_stored() -> None:
    database = MemoryDatabase()
    store = MemoryConversationStore(database)
    engine = FakeEngine()
    accounts = FakeAccountStore(Clock(at("2026-12-08T10:00:00")))
    ledger = Ledger(accounts, BudgetDefaults(user_daily=1), clock=accounts.clock)  # type: ignore[arg-type]
    conversations = accounted(store, engine, ledger)
    chat, _ = await store.create_chat("alice", "", "", HistoryStrategy.FULL)

    # The first turn is admitted (nothing used yet) and its usage recorded with the reply.
    async with aclosing(conversations.complete("alice", chat.id, "Hello?", SAMPLING, "r1")) as events:
        finished = [event async for event in events if isinstance(event, Finished)]
    [entry] = database.usage
    assert (entry.user_id, entry.kind, entry.outcome) == ("alice", UsageKind.CHAT, UsageOutcome.STOP)
    assert entry.completion_tokens == finished[0].completion_tokens > 0
    assert entry.message_id == finished[0].assistant_message_id
    # The fake accounting store is charged the way the SQL one is, through the ledger's own record.
    await ledger.record(entry)

    before = [m.content for m in await store.history("alice", chat.id)]
    with pytest.raises(BudgetExhausted, match="your daily token budget of 1 tokens is used up"):
        async with aclosing(conversations.complete("alice", chat.id, "Again?", SAMPLING, "r2")) as events:
            [event async for event in events]
    jobs = Jobs(MemoryJobStore(database), RecordingQueue(), conversations)
    with pytest.raises(BudgetExhausted, match="resets at 2026-12-09T00:00:00Z"):
        await jobs.submit("alice", chat.id, "Later?", SAMPLING, "j1", use_cache=False)
    assert [m.content for m in await store.history("alice", chat.id)] == before
    assert list(database.jobs) == []
    assert len(database.usage) == 1
