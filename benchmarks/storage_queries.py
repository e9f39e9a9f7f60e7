"""Latency of the conversation store's hot reads on PostgreSQL, through the real store.

Seeds one user with 1,000 chats (one of them with 500 messages, the rest with a few each) and 20 other
users with 200 chats each, so that the indexes have other users' rows to skip. Then times, through
`SqlConversationStore`, N calls each (after a warm-up) of:

- `list_chats(limit=20)`: the first page, and a page 500 chats deep (keyset cursor);
- `messages_page(limit=50)`: the first page of the 500-message chat, and a page 250 messages in.

Prints p50/p90/p99 in milliseconds and the planner's own plans (EXPLAIN ANALYZE) for the statements the
store ran.

    .venv/bin/python benchmarks/storage_queries.py [URL] [--iterations 300]

Without URL, a fresh database is created on postgresql://postgres@127.0.0.1:5432 (through the `test`
database) and dropped at the end. With a URL, the schema is migrated there, the benchmark's own rows are
seeded under fresh user ids and deleted at the end.

Target: p50 <= 3 ms for each query.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, event, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_service.domain import ChatCursor, HistoryStrategy, Role
from chat_service.storage.models import ChatRow, MessageRow
from chat_service.storage.sql import SqlConversationStore, open_sql_store
from tests.support.databases import fresh_postgres_database

TARGET_P50_MS = 3.0

USER_CHATS = 1_000
BIG_CHAT_MESSAGES = 500
OTHER_USERS = 20
OTHER_USER_CHATS = 200
MESSAGES_PER_SMALL_CHAT = 6
BATCH = 2_000
WARMUP = 30


@dataclass(frozen=True)
class Seeded:
    """What the timed queries need to know about the seeded data."""

    user_id: str
    user_ids: list[str]
    big_chat_id: uuid.UUID
    chat_ids: list[uuid.UUID]


def _message(chat_id: uuid.UUID, user_id: str, i: int, at: datetime) -> dict[str, Any]:
    role = Role.USER if i % 2 == 0 else Role.ASSISTANT
    return {
        "id": uuid.uuid4(),
        "chat_id": chat_id,
        "user_id": user_id,
        "role": role.value,
        "content": f"message {i}: " + "lorem ipsum dolor sit amet " * 8,
        "token_count": 60,
        "finish_reason": "stop" if role is Role.ASSISTANT else None,
        "request_id": None,
        "reply_to": None,
        "summary": None,
        "created_at": at + timedelta(seconds=i),
    }


async def _insert(store: SqlConversationStore, table: Any, rows: list[dict[str, Any]], label: str) -> None:
    for start in range(0, len(rows), BATCH):
        async with store.engine.begin() as connection:
            await connection.execute(insert(table), rows[start : start + BATCH])
        done = min(start + BATCH, len(rows))
        print(f"\r  {label}: {done:,}/{len(rows):,}", end="", flush=True)
    print()


async def seed(store: SqlConversationStore, rng: random.Random) -> Seeded:
    """Insert the benchmark's users, chats and messages (bulk inserts: the store's write path is not what
    is measured here)."""
    run = uuid.uuid4().hex[:8]
    user_id = f"bench-{run}-main"
    others = [f"bench-{run}-{i:02d}" for i in range(OTHER_USERS)]
    now = datetime.now(UTC)
    chats: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    owners = [(user_id, USER_CHATS)] + [(other, OTHER_USER_CHATS) for other in others]
    for owner, count in owners:
        for _ in range(count):
            created = now - timedelta(days=90, seconds=rng.randrange(0, 30 * 86_400))
            chat_id = uuid.uuid4()
            chats.append(
                {
                    "id": chat_id,
                    "user_id": owner,
                    "title": f"chat {len(chats)}",
                    "system_prompt": "",
                    "history_strategy": HistoryStrategy.WINDOW.value,
                    "request_id": None,
                    "created_at": created,
                    "last_activity_at": created + timedelta(seconds=rng.randrange(0, 60 * 86_400)),
                }
            )
            messages += [_message(chat_id, owner, i, created) for i in range(MESSAGES_PER_SMALL_CHAT)]
    big = chats[0]
    # Replace the big chat's few messages by 500, interleaved in seq order with everyone else's traffic.
    messages = [m for m in messages if m["chat_id"] != big["id"]]
    big_messages = [_message(big["id"], user_id, i, big["created_at"]) for i in range(BIG_CHAT_MESSAGES)]
    spacing = len(messages) // BIG_CHAT_MESSAGES
    for i, message in enumerate(big_messages):
        messages.insert(i * (spacing + 1), message)
    rng.shuffle(chats)

    print(f"seeding {len(owners)} users, {len(chats):,} chats, {len(messages):,} messages")
    await _insert(store, ChatRow.__table__, chats, "chats")
    await _insert(store, MessageRow.__table__, messages, "messages")
    async with store.engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text("VACUUM ANALYZE chats"))
        await autocommit.execute(text("VACUUM ANALYZE messages"))
    return Seeded(
        user_id=user_id,
        user_ids=[user_id, *others],
        big_chat_id=big["id"],
        chat_ids=[c["id"] for c in chats],
    )


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(name: str, call: Callable[[], Awaitable[object]], iterations: int) -> float:
    """Run `call` WARMUP times, then time it `iterations` times; print and return p50 in ms."""
    for _ in range(WARMUP):
        await call()
    samples: list[float] = []
    for _ in range(iterations):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    p50 = percentile(samples, 0.50)
    verdict = "ok" if p50 <= TARGET_P50_MS else f"ABOVE TARGET {TARGET_P50_MS} ms"
    print(
        f"  {name:<36} p50 {p50:6.3f}  p90 {percentile(samples, 0.90):6.3f}  "
        f"p99 {percentile(samples, 0.99):6.3f}  mean {statistics.fmean(samples):6.3f} ms  [{verdict}]"
    )
    return p50


async def explain(store: SqlConversationStore, name: str, call: Callable[[], Awaitable[object]]) -> None:
    """Print EXPLAIN ANALYZE of the data query `call` runs through the store (planner settings untouched)."""
    captured: list[tuple[str, Any]] = []

    def capture(connection: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.startswith("SELECT") and "LIMIT" in statement:
            captured.append((statement, parameters))

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await call()
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    statement, parameters = captured[0]
    async with store.engine.connect() as connection:
        rows = await connection.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
        print(f"  {name}:")
        for (line,) in rows:
            print(f"    {line}")


async def run(url: str, iterations: int, *, cleanup: bool) -> bool:
    """Seed, time and explain; True if every p50 meets the target."""
    async with open_sql_store(url, migrate=True) as store:
        seeded = await seed(store, random.Random(7))
        try:
            user, big = seeded.user_id, seeded.big_chat_id
            deep = await store.list_chats(user, 500, None)
            deep_cursor = ChatCursor(deep[-1].last_activity_at, deep[-1].id)
            middle = (await store.messages_page(user, big, BIG_CHAT_MESSAGES // 2, None))[-1].seq
            queries: dict[str, Callable[[], Awaitable[object]]] = {
                "list_chats(20) first page": lambda: store.list_chats(user, 20, None),
                "list_chats(20) after 500 chats": lambda: store.list_chats(user, 20, deep_cursor),
                "messages_page(50) first page": lambda: store.messages_page(user, big, 50, None),
                "messages_page(50) after 250 messages": lambda: store.messages_page(user, big, 50, middle),
            }
            print(f"timing {iterations} calls each after {WARMUP} warm-up calls:")
            p50s = [await timed(name, call, iterations) for name, call in queries.items()]
            print("plans (EXPLAIN ANALYZE, default planner settings):")
            for name, call in queries.items():
                await explain(store, name, call)
        finally:
            if cleanup:
                async with store.engine.begin() as connection:
                    await connection.execute(
                        delete(MessageRow).where(MessageRow.user_id.in_(seeded.user_ids))
                    )
                    await connection.execute(delete(ChatRow).where(ChatRow.user_id.in_(seeded.user_ids)))
    return all(p50 <= TARGET_P50_MS for p50 in p50s)


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", nargs="?", help="postgresql+asyncpg://... (default: a fresh database)")
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    if args.url:
        ok = await run(args.url, args.iterations, cleanup=True)
    else:
        async with fresh_postgres_database("chatmesh_bench") as url:
            ok = await run(url, args.iterations, cleanup=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
