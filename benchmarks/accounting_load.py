"""Accounting load test (issue 28): the mesh with usage accounting and budgets on, side by side with it off.

The whole mesh through Envoy on PostgreSQL with the real model, as `load_test.py` runs it: the inference
service (llama_server backend, `--slots` slots and a queue of as many) and one PostgreSQL database stay up
for the whole run; each phase starts two chat replicas (CHATMESH_CHAT_ACCOUNTING off or on) and Envoy in
front of them, and stops them after. `--users` users in `--groups` groups (a `group` claim in each JWT) take
part. With the accounting on, every user has budgets: defaults from settings (per user and per group, per
day and per month) far above what the run uses, and overrides stored through the admin API
(`PUT /admin/budgets`) for `--overrides` users and one group, so a budget check reads overrides too.

Each phase measures:

1. `GET /chats` (a page of 20; every user was given `--chats` empty chats first): `--workers` clients, one
   HTTP/1.1 keep-alive connection each, cycling through the users for `--seconds` (after 3 s of the same
   not counted): req/s, p50/p99, how many responses carried the `x-ratelimit-*-tokens` headers.
2. Completions: every user asks one short question in a new chat (`POST /chat`, greedy, `--max-tokens`),
   `--concurrency` at a time: completions/s, generated tokens/s, TTFT p50/p99.

For both, the CPU time per request of the chat replicas, Envoy and this database's PostgreSQL backends
(from /proc): the cost the accounting adds, which other work on a shared machine slows but does not add
to, unlike the rates.

The phases run off, on, on, off, ... (`--rounds` pairs, the order alternating to cancel drift); the ratios
on/off are printed per round and over all rounds. After each phase with the accounting on, PostgreSQL is
checked: every reply of that phase has exactly one usage record, the replies of phases with it off none,
the records' completion tokens are what the clients were told, and every running total (user and group,
day and month) equals the sum of its records.

    .venv/bin/python benchmarks/accounting_load.py [--users 200] [--groups 5] [--seconds 10] [--workers 32]
        [--concurrency 8] [--max-tokens 8] [--rounds 2] [--slots 8] [--chats 20] [--overrides 5]
        [--budget-cache-s S]   # how long a replica reuses a user's budget use for the headers of
                               # calls that generate nothing (default: the setting's, 1 s)

Target (issue 28): with the accounting on, >= 90% of the GET /chats and completion throughput without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_test import QUESTIONS, Outcome, ms, new_chat, pct, stream_completion  # a sibling script

from chatmesh.common.auth import JwtKeys, issue_token
from gateway import GatewaySettings
from tests.support.chat import TEST_SECRET, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import free_port, run_service
from tests.support.stack import Stack, chat_stack, inference_env

ADMIN = "bench-admin"
"""The admin that stores the budget overrides (CHATMESH_CHAT_ADMIN_USERS)."""

RATELIMIT_HEADER = "x-ratelimit-remaining-tokens"

# Budgets far above what a run uses (a few thousand tokens per user), so none refuses: the run measures
# the cost of checking and recording, not refusals.
DEFAULT_BUDGETS = {
    "budget_user_daily_tokens": 1_000_000,
    "budget_user_monthly_tokens": 10_000_000,
    "budget_group_daily_tokens": 50_000_000,
    "budget_group_monthly_tokens": 500_000_000,
}
OVERRIDE_TOKENS = 2_000_000


@dataclass(frozen=True)
class User:
    name: str
    group: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


def make_users(count: int, groups: int) -> list[User]:
    """`count` users, spread over `groups` groups, with a JWT each carrying the group claim."""
    keys = JwtKeys.hs256(TEST_SECRET)
    users = []
    for number in range(count):
        name, group = f"user-{number:03d}", f"team-{number % groups}"
        users.append(User(name, group, issue_token(keys, name, extra_claims={"group": group})))
    return users


@dataclass
class ListResult:
    requests: int
    seconds: float
    latencies: list[float]
    failures: int
    with_header: int
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds


@dataclass
class CompletionResult:
    seconds: float
    outcomes: list[tuple[User, Outcome]]
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def served(self) -> list[tuple[User, Outcome]]:
        return [(u, o) for u, o in self.outcomes if o.status == 200 and o.finished]

    @property
    def per_s(self) -> float:
        return len(self.served) / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return sum(o.tokens for _, o in self.served) / self.seconds

    @property
    def ttfts(self) -> list[float]:
        return [o.ttft_s for _, o in self.served]


@dataclass
class Phase:
    accounting: bool
    listing: ListResult
    completions: CompletionResult

    @property
    def name(self) -> str:
        return "on" if self.accounting else "off"


@dataclass
class Asked:
    """The request ids of the completions answered in phases with the accounting on and off, and the
    completion tokens the clients were told of, to check the database against."""

    on: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Request id: (completion tokens, the user's group)."""
    off: list[str] = field(default_factory=list)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used, 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds used by the chat replicas, Envoy and this database's PostgreSQL backends since the
    meter was started: the cost per request, which other work on the machine slows but does not add to
    (unlike req/s, which it lowers: everything shares the 2 cores)."""

    dsn: str
    parts: dict[str, list[int]]
    start: dict[int, float] = field(default_factory=dict)

    async def backends(self) -> list[int]:
        connection = await asyncpg.connect(self.dsn)
        try:
            rows = await connection.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await connection.close()
        return [row["pid"] for row in rows]

    async def begin(self) -> None:
        pids = [pid for pids in self.parts.values() for pid in pids] + await self.backends()
        self.start = {pid: cpu_s(pid) for pid in pids}

    async def used(self) -> dict[str, float]:
        """CPU seconds by part (replicas, Envoy, PostgreSQL) since `begin`."""
        parts = {**self.parts, "PostgreSQL": await self.backends()}
        return {
            name: sum(max(0.0, cpu_s(pid) - self.start.get(pid, 0.0)) for pid in pids)
            for name, pids in parts.items()
        }


def cpu_line(used: dict[str, float], requests: int, unit: str) -> str:
    each = "  ".join(f"{name} {1000 * seconds / requests:.2f}" for name, seconds in used.items())
    return f"    CPU ms per {unit}: {each}  (all {1000 * sum(used.values()) / requests:.2f})"


@contextlib.asynccontextmanager
async def worker_clients(base_url: str, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` clients of one keep-alive connection each; a worker sets its user's header per request."""
    async with contextlib.AsyncExitStack() as stack:
        made = []
        for _ in range(count):
            client = httpx.AsyncClient(
                base_url=base_url,
                timeout=120,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                trust_env=False,
            )
            made.append(await stack.enter_async_context(client))
        yield made


async def each_user(
    base_url: str,
    users: Sequence[User],
    workers: int,
    job: Callable[[httpx.AsyncClient, User], Awaitable[None]],
) -> None:
    """`job` once for every user, `workers` at a time, each worker on its own connection."""
    queue = iter(users)
    async with worker_clients(base_url, workers) as made:

        async def worker(client: httpx.AsyncClient) -> None:
            for user in queue:  # one iterator shared by the workers: each user once
                client.headers.update(user.headers)
                await job(client, user)

        await asyncio.gather(*(worker(client) for client in made))


async def seed_chats(base_url: str, users: Sequence[User], chats: int, workers: int) -> None:
    """`chats` empty chats per user, so that every `GET /chats` returns a full page from the start."""
    started = time.perf_counter()

    async def job(client: httpx.AsyncClient, user: User) -> None:
        for _ in range(chats):
            await new_chat(client)

    await each_user(base_url, users, workers, job)
    print(
        f"  {chats} empty chats for each of {len(users)} users in {time.perf_counter() - started:.0f} s",
        flush=True,
    )


async def list_chats(
    base_url: str,
    users: Sequence[User],
    workers: int,
    seconds: float,
    what: str = "GET /chats",
    meter: CpuMeter | None = None,
) -> ListResult:
    """`GET /chats` for `seconds`, `workers` at a time, the users in turn."""
    latencies: list[float] = []
    failures = with_header = 0
    turn = itertools.cycle(users)

    async with worker_clients(base_url, workers) as made:
        deadline = time.perf_counter() + seconds

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal failures, with_header
            while time.perf_counter() < deadline:
                client.headers.update(next(turn).headers)
                started = time.perf_counter()
                response = await client.get("/chats", params={"page_size": 20})
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200
                with_header += RATELIMIT_HEADER in response.headers

        if meter is not None:
            await meter.begin()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in made))
        elapsed = time.perf_counter() - started
        cpu = await meter.used() if meter is not None else {}
    result = ListResult(len(latencies), elapsed, latencies, failures, with_header, cpu)
    print(
        f"  {what}, {workers} clients, {elapsed:.1f} s: {result.per_s:6.0f} req/s  {ms(latencies)}"
        f"  non-200: {failures}  with {RATELIMIT_HEADER}: {with_header}/{len(latencies)}",
        flush=True,
    )
    if cpu:
        print(cpu_line(cpu, len(latencies), "request"), flush=True)
    return result


async def complete(
    base_url: str,
    users: Sequence[User],
    concurrency: int,
    max_tokens: int,
    what: str = "completions",
    meter: CpuMeter | None = None,
) -> CompletionResult:
    """Each of `users` asks one question in a new chat, `concurrency` at a time."""
    outcomes: list[tuple[User, Outcome]] = []

    async def job(client: httpx.AsyncClient, user: User) -> None:
        question = QUESTIONS[len(outcomes) % len(QUESTIONS)]
        outcomes.append((user, await stream_completion(client, question, max_tokens)))
        if len(outcomes) % 50 == 0:
            print(f"    {len(outcomes)}/{len(users)} completions", flush=True)

    if meter is not None:
        await meter.begin()
    started = time.perf_counter()
    await each_user(base_url, users, concurrency, job)
    elapsed = time.perf_counter() - started
    result = CompletionResult(elapsed, outcomes, await meter.used() if meter is not None else {})
    refused = len(outcomes) - len(result.served)
    print(
        f"  {what}, {concurrency} at a time, {result.seconds:.1f} s: {result.per_s:5.2f} completions/s"
        f"  {result.tokens_per_s:5.1f} tokens/s  TTFT {ms(result.ttfts)}  not served: {refused}",
        flush=True,
    )
    if result.cpu:
        print(cpu_line(result.cpu, max(1, len(result.served)), "completion"), flush=True)
    return result


async def set_overrides(base_url: str, users: Sequence[User], overrides: int) -> None:
    """Budget overrides through the admin API for `overrides` users (day and month) and the first group
    (day), then the budgets in force as the admin API lists them."""
    admin = {"authorization": f"Bearer {token_for(ADMIN)}"}
    bodies = [
        {
            "scope": "BUDGET_SCOPE_USER",
            "subject": user.name,
            "period": period,
            "limit_tokens": OVERRIDE_TOKENS,
        }
        for user in users[:overrides]
        for period in ("BUDGET_PERIOD_DAY", "BUDGET_PERIOD_MONTH")
    ]
    bodies.append(
        {
            "scope": "BUDGET_SCOPE_GROUP",
            "subject": users[0].group,
            "period": "BUDGET_PERIOD_DAY",
            "limit_tokens": 10 * OVERRIDE_TOKENS,
        }
    )
    async with httpx.AsyncClient(base_url=base_url, headers=admin, timeout=30, trust_env=False) as client:
        for body in bodies:
            response = await client.put("/admin/budgets", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"PUT /admin/budgets answered {response.status_code}: {response.text}")
        response = await client.get("/admin/budgets")
        if response.status_code != 200:
            raise RuntimeError(f"GET /admin/budgets answered {response.status_code}: {response.text}")
        listed = response.json().get("budgets", [])
    print(
        f"  {len(bodies)} budget overrides stored; GET /admin/budgets lists {len(listed)} budgets", flush=True
    )


async def check_rows(dsn: str, asked: Asked) -> None:
    """Every reply of a phase with the accounting on has exactly one usage record (with the completion
    tokens its client was told, charged to the user's group), every reply of a phase with it off none,
    and every running total equals the sum of the records it counts."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            """SELECT q.request_id, a.id AS reply, COUNT(u.id) AS records,
                      COALESCE(SUM(u.completion_tokens), 0) AS completion_tokens,
                      COALESCE(MIN(u.user_group), '') AS user_group
               FROM messages q JOIN messages a ON a.reply_to = q.id
               LEFT JOIN usage_records u ON u.message_id = a.id
               WHERE q.role = 'user' AND q.request_id = ANY($1::text[])
               GROUP BY q.request_id, a.id""",
            list(asked.on) + asked.off,
        )
        all_records = await connection.fetchval("SELECT COUNT(*) FROM usage_records")
        totals = await connection.fetchval("SELECT COUNT(*) FROM usage_totals")
        mismatched_totals = await connection.fetch(TOTALS_CHECK)
    finally:
        await connection.close()
    replies: dict[str, list[tuple[int, int, str]]] = {}
    for row in rows:
        replies.setdefault(row["request_id"], []).append(
            (row["records"], row["completion_tokens"], row["user_group"])
        )
    bad_on = [r for r, (tokens, group) in asked.on.items() if replies.get(r) != [(1, tokens, group)]]
    bad_off = [r for r in asked.off if replies.get(r) != [(0, 0, "")]]
    print(
        f"  rows: {len(asked.on)} replies with the accounting on, each with exactly 1 usage record of the"
        f" tokens the client was told and the user's group: {'yes' if not bad_on else bad_on[:5]};"
        f" {len(asked.off)} with it off, with none: {'yes' if not bad_off else bad_off[:5]};"
        f" usage records in all: {all_records}; {totals} running totals, each equal to the sum of its"
        f" records: {'yes' if not mismatched_totals else [dict(r) for r in mismatched_totals[:5]]}",
        flush=True,
    )
    if bad_on or bad_off or all_records != len(asked.on) or mismatched_totals:
        raise SystemExit("the usage records or totals do not match the completions")


# The totals the records add up to (user and group, day and month), against `usage_totals`: the rows
# where they differ, or where one side has a row the other lacks.
TOTALS_CHECK = """
WITH charged AS (
    SELECT user_id, user_group, day, date_trunc('month', day)::date AS month,
           prompt_tokens + completion_tokens AS tokens
    FROM usage_records
), expected AS (
    SELECT 'user' AS scope, user_id AS subject, 'day' AS period, day AS period_start, SUM(tokens) AS tokens
    FROM charged GROUP BY user_id, day
    UNION ALL
    SELECT 'user', user_id, 'month', month, SUM(tokens) FROM charged GROUP BY user_id, month
    UNION ALL
    SELECT 'group', user_group, 'day', day, SUM(tokens) FROM charged WHERE user_group <> ''
    GROUP BY user_group, day
    UNION ALL
    SELECT 'group', user_group, 'month', month, SUM(tokens) FROM charged WHERE user_group <> ''
    GROUP BY user_group, month
)
SELECT scope, subject, period, period_start, e.tokens AS records, t.tokens AS total
FROM expected e FULL OUTER JOIN usage_totals t USING (scope, subject, period, period_start)
WHERE e.tokens IS DISTINCT FROM t.tokens
"""


@contextlib.asynccontextmanager
async def mesh_phase(
    args: argparse.Namespace, inference: str, url: str, run_dir: Path, accounting: bool
) -> AsyncIterator[Stack]:
    """Two chat replicas with the accounting `accounting` and Envoy in front, until the block ends."""
    budgets: dict[str, object] = {**DEFAULT_BUDGETS} if accounting else {}
    if accounting and args.budget_cache_s is not None:
        budgets["budget_cache_s"] = args.budget_cache_s
    async with chat_stack(
        inference,
        url,
        replicas=2,
        envoy_dir=run_dir / f"envoy-{time.monotonic_ns()}",
        gateway={
            # As deployed: the default per-user rate limit (200 users stay far below it) and admission at
            # the edge of what the engine holds, as load_test.py runs it.
            "rate_limit_per_s": GatewaySettings.model_fields["rate_limit_per_s"].default,
            "rate_limit_burst": GatewaySettings.model_fields["rate_limit_burst"].default,
            "max_active_completions": 2 * args.slots,
            "health_check_interval_s": GatewaySettings.model_fields["health_check_interval_s"].default,
        },
        log_level="WARNING",
        accounting=accounting,
        admin_users=[ADMIN],
        **budgets,
    ) as stack:
        yield stack


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def ratio_line(what: str, on: Sequence[float], off: Sequence[float]) -> str:
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    return (
        f"{what:<28} off {statistics.mean(off):8.2f}  on {statistics.mean(on):8.2f}"
        f"  on/off per round {' '.join(f'{r:.3f}' for r in ratios)}"
        f"  median {statistics.median(ratios):.3f}  of the sums {sum(on) / sum(off):.3f}"
    )


def summary(phases: list[Phase]) -> None:
    on = [p for p in phases if p.accounting]
    off = [p for p in phases if not p.accounting]
    print()
    print(f"summary over {len(on)} rounds (each ratio: a round's 'on' phase over its 'off' phase)")
    print(ratio_line("GET /chats req/s", [p.listing.per_s for p in on], [p.listing.per_s for p in off]))
    print(
        ratio_line(
            "GET /chats p50 ms",
            [1000 * pct(p.listing.latencies, 0.5) for p in on],
            [1000 * pct(p.listing.latencies, 0.5) for p in off],
        )
    )
    print(
        ratio_line(
            "GET /chats p99 ms",
            [1000 * pct(p.listing.latencies, 0.99) for p in on],
            [1000 * pct(p.listing.latencies, 0.99) for p in off],
        )
    )
    print(ratio_line("completions/s", [p.completions.per_s for p in on], [p.completions.per_s for p in off]))
    print(
        ratio_line(
            "tokens/s", [p.completions.tokens_per_s for p in on], [p.completions.tokens_per_s for p in off]
        )
    )
    for part in ("replicas", "Envoy", "PostgreSQL"):
        print(
            ratio_line(
                f"CPU ms/GET, {part}",
                [1000 * p.listing.cpu[part] / p.listing.requests for p in on],
                [1000 * p.listing.cpu[part] / p.listing.requests for p in off],
            )
        )
    for part in ("replicas", "PostgreSQL"):
        print(
            ratio_line(
                f"CPU ms/completion, {part}",
                [1000 * p.completions.cpu[part] / len(p.completions.served) for p in on],
                [1000 * p.completions.cpu[part] / len(p.completions.served) for p in off],
            )
        )
    print(
        ratio_line(
            "TTFT p50 ms",
            [1000 * pct(p.completions.ttfts, 0.5) for p in on],
            [1000 * pct(p.completions.ttfts, 0.5) for p in off],
        )
    )


async def measure(
    args: argparse.Namespace, stack: Stack, dsn: str, users: Sequence[User], accounting: bool, asked: Asked
) -> Phase:
    """One phase's measurements on a started mesh; its answered requests noted in `asked`."""
    base_url = stack.envoy.base_url
    meter = CpuMeter(
        dsn,
        {"replicas": [replica.process.pid for replica in stack.replicas], "Envoy": [stack.envoy.process.pid]},
    )
    warm_up = await complete(base_url, users[: 2 * args.concurrency], args.concurrency, 4, "warm-up")
    # Each user seen by both replicas first: a replica notes a user's group once (a write) and then from
    # its memory, which is the steady state measured.
    await list_chats(base_url, users, args.workers, 3, "warm-up")
    listing = await list_chats(base_url, users, args.workers, args.seconds, meter=meter)
    completions = await complete(base_url, users, args.concurrency, args.max_tokens, meter=meter)
    print(f"  {load()}", flush=True)
    for user, outcome in warm_up.served + completions.served:
        if accounting:
            asked.on[outcome.request_id] = (outcome.tokens, user.group)
        else:
            asked.off.append(outcome.request_id)
    return Phase(accounting, listing, completions)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--groups", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10, help="GET /chats phase length")
    parser.add_argument("--workers", type=int, default=32, help="GET /chats clients (one connection each)")
    parser.add_argument("--concurrency", type=int, default=8, help="completions at once")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of phases, off/on then on/off, ...")
    parser.add_argument("--slots", type=int, default=8, help="engine slots (and its queue)")
    parser.add_argument("--chats", type=int, default=20, help="empty chats per user before the phases")
    parser.add_argument("--overrides", type=int, default=5, help="users with stored budget overrides")
    parser.add_argument(
        "--budget-cache-s",
        type=float,
        default=None,
        help="CHATMESH_CHAT_BUDGET_CACHE_S with the accounting on (default: the setting's default)",
    )
    args = parser.parse_args()
    users = make_users(args.users, args.groups)
    inference = f"127.0.0.1:{free_port()}"
    phases: list[Phase] = []
    asked = Asked()
    overrides_set = False
    print(f"before: {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="chatmesh-accounting-") as run_dir:
        async with fresh_postgres_database("chatmesh_accounting") as url:
            dsn = url.replace("postgresql+asyncpg://", "postgresql://")
            engine_env = inference_env(
                inference,
                log_level="WARNING",
                max_concurrent=args.slots,
                max_queue=args.slots,
                run_dir=run_dir,
            )
            print(
                f"starting the inference service ({args.slots} slots + a queue of {args.slots})...",
                flush=True,
            )
            with run_service("inference_service", engine_env, inference, timeout=180):
                order = [[False, True] if r % 2 == 0 else [True, False] for r in range(args.rounds)]
                for number, accounting in enumerate(itertools.chain.from_iterable(order)):
                    name = "on" if accounting else "off"
                    print(
                        f"phase {number + 1}/{2 * args.rounds}: accounting {name}; starting 2 chat replicas"
                        " and Envoy...",
                        flush=True,
                    )
                    async with mesh_phase(args, inference, url, Path(run_dir), accounting) as stack:
                        if number == 0:
                            # POST /chat is a completion route: the edge admits 2 x slots at once.
                            await seed_chats(stack.envoy.base_url, users, args.chats, args.concurrency)
                        if accounting and not overrides_set:
                            await set_overrides(stack.envoy.base_url, users, args.overrides)
                            overrides_set = True
                        phases.append(await measure(args, stack, dsn, users, accounting, asked))
                    if accounting:
                        await check_rows(dsn, asked)
    summary(phases)
    print(f"after: {load()}")


if __name__ == "__main__":
    asyncio.run(main())
