"""Usage accounting through the real mesh: Envoy in front of two chat replicas on one PostgreSQL database,
the session's engine, and the semantic cache in the session's embedding service. Users chat over REST
with sign-in tokens carrying a group claim; admins carry the admin role.

- a budget an admin sets mid-conversation refuses the turn after it is reached: 429 naming the daily
  budget and its reset (the next 00:00 UTC), a retry hint, and nothing stored for the refused turn;
- a cached answer is recorded as cached tokens (charged nothing), both answers as requests;
- a retried completion (the same `request_id`, one after another or all at once) is recorded once;
- a default budget from the settings (`CHATMESH_CHAT_BUDGET_USER_DAILY_TOKENS`) holds for every user
  until an override lifts it for one;
- users see only their own usage; admins see everyone's, and set and clear budgets that take effect;
- the OpenAI API's completions are recorded with kind `openai`, summaries with kind `summary`;
- every response carries the `x-ratelimit-*-tokens` headers of the caller's most constraining budget.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from chatmesh.common.auth import JwtKeys, issue_token
from tests.support.chat import TEST_SECRET
from tests.support.databases import fresh_postgres_database
from tests.support.processes import LoggedProcess
from tests.support.services import cache_entries
from tests.support.stack import TEST_MODEL, Stack, chat_stack
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

GROUP = "research"
QUESTION = "What is the capital of France?"
"""The base model answers it greedily with a short sentence that ends on its own (what the cache keeps)."""

COLLECTION = f"answers_{uuid.uuid4().hex[:12]}"
"""This module's cache collection in the session's embedding service (apart from other modules')."""


def token(user: str, group: str = GROUP, admin: bool = False) -> str:
    claims: dict[str, Any] = {"group": group}
    if admin:
        claims["role"] = ["user", "admin"]
    return issue_token(JwtKeys.hs256(TEST_SECRET), user, 3600, claims)


def headers(user: str, group: str = GROUP, admin: bool = False) -> dict[str, str]:
    return {"authorization": f"Bearer {token(user, group, admin)}"}


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def mesh(
    tmp_path_factory: pytest.TempPathFactory,
    inference_address: str,
    embedding_service: tuple[str, LoggedProcess],
) -> AsyncIterator[Stack]:
    async with (
        fresh_postgres_database() as url,
        chat_stack(
            inference_address,
            url,
            replicas=2,
            envoy_dir=tmp_path_factory.mktemp("envoy"),
            # The edge's rate limit is tested elsewhere; here it would only race the polling.
            gateway={"rate_limit_per_s": 0},
            cache_address=embedding_service[0],
            cache_collection=COLLECTION,
            # Generous: a lookup on a busy test machine must not turn a hit into a miss.
            cache_lookup_timeout_s=10,
        ) as stack,
    ):
        yield stack


@pytest.fixture
async def http(mesh: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.envoy.base_url, timeout=60.0) as client:
        yield client


@pytest.fixture
async def db(mesh: Stack) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(mesh.database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        yield connection
    finally:
        await connection.close()


@dataclass
class Stream:
    """A whole REST completion: its HTTP status and its events (the error body, when refused)."""

    status: int
    events: list[dict[str, Any]]
    headers: httpx.Headers

    @property
    def first(self) -> dict[str, Any]:
        return self.events[0]

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(event.get("delta", "") for event in self.events)


async def chat(http: httpx.AsyncClient, user: str, content: str, chat_id: str = "", **body: Any) -> Stream:
    """One REST completion as `user` (a new chat without `chat_id`), greedy and short by default."""
    path = f"/chat/{chat_id}/completion" if chat_id else "/chat"
    payload = {"content": content, "max_tokens": 8, "temperature": 0, **body}
    async with http.stream("POST", path, json=payload, headers=headers(user)) as response:
        body_text = (await response.aread()).decode()
    if response.status_code != 200:
        return Stream(response.status_code, [json.loads(body_text)], response.headers)
    blocks = body_text.replace("\r\n", "\n").split("\n\n")
    events = [
        json.loads("\n".join(line[5:].strip() for line in block.splitlines() if line.startswith("data:")))
        for block in blocks
        if "data:" in block
    ]
    return Stream(response.status_code, events, response.headers)


def answered(stream: Stream) -> tuple[int, int]:
    """The (prompt, completion) tokens of a completion that streamed to its end."""
    assert stream.status == 200, stream.events
    usage = stream.last.get("usage", {})
    assert stream.last.get("assistant_message_id"), stream.last
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


def number(row: dict[str, Any], field: str) -> int:
    """An int64 of a REST reply (a JSON string; absent when 0)."""
    return int(row.get(field, 0))


async def usage_of(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    reply = await http.get("/usage", headers=headers(user))
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def today_row(usage: dict[str, Any]) -> dict[str, Any]:
    today = datetime.now(UTC).date().isoformat()
    rows: list[dict[str, Any]] = [
        row for row in usage.get("usage", []) if row["day"] == today and row["model"] == TEST_MODEL
    ]
    assert len(rows) == 1, usage
    return rows[0]


def user_day_budget(usage: dict[str, Any]) -> dict[str, Any]:
    budgets: list[dict[str, Any]] = [
        b
        for b in usage["budgets"]
        if b["scope"] == "BUDGET_SCOPE_USER" and b["period"] == "BUDGET_PERIOD_DAY"
    ]
    assert len(budgets) == 1, usage
    return budgets[0]


async def set_budget(http: httpx.AsyncClient, user: str, tokens: int, clear: bool = False) -> dict[str, Any]:
    body = {
        "scope": "BUDGET_SCOPE_USER",
        "subject": user,
        "period": "BUDGET_PERIOD_DAY",
        "limit_tokens": tokens,
        "clear": clear,
    }
    reply = await http.put("/admin/budgets", json=body, headers=headers("boss", admin=True))
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


async def messages(http: httpx.AsyncClient, user: str, chat_id: str) -> list[dict[str, Any]]:
    reply = await http.get(f"/chat/{chat_id}/messages", headers=headers(user))
    assert reply.status_code == 200, reply.text
    return reply.json().get("messages", [])  # type: ignore[no-any-return]


async def test_a_budget_reached_mid_conversation_refuses_the_next_turn_until_its_reset(
    mesh: Stack, http: httpx.AsyncClient
) -> None:
    user = new_user()
    first = await chat(http, user, "Name a colour.")
    prompt, completion = answered(first)
    chat_id = first.first["chat_id"]
    used = prompt + completion
    assert number(user_day_budget(await usage_of(http, user)), "used_tokens") == used

    # Just above one turn: the next turn is admitted, the one after it is not.
    limit = used + 1
    budget = await set_budget(http, user, limit)
    assert (budget["subject"], number(budget, "limit_tokens")) == (user, limit), budget
    assert (number(budget, "used_tokens"), number(budget, "remaining_tokens")) == (used, 1), budget
    assert budget["overridden"] is True

    second_prompt, second_completion = answered(await chat(http, user, "Name another one.", chat_id))
    used += second_prompt + second_completion
    before = await messages(http, user, chat_id)
    assert len(before) == 4

    refused = await chat(http, user, "And a third?", chat_id)
    now = datetime.now(UTC)
    assert refused.status == 429, refused.events
    error = refused.last
    assert error["code"] == "RESOURCE_EXHAUSTED", error
    reset = (now.date() + timedelta(days=1)).isoformat() + "T00:00:00Z"
    assert error["message"] == (
        f"your daily token budget of {limit} tokens is used up ({used} used); it resets at {reset}"
    ), error
    assert await messages(http, user, chat_id) == before, "nothing is stored for a refused turn"

    # The retry hint is the time to the reset, in both forms.
    async with httpx.AsyncClient(base_url=str(http.base_url), timeout=60.0) as client:
        raw = await client.post(
            f"/chat/{chat_id}/completion", json={"content": "Please?"}, headers=headers(user)
        )
    assert raw.status_code == 429, raw.text
    retry_after_ms = int(raw.headers["retry-after-ms"])
    retry_after_s = int(raw.headers["retry-after"])
    assert 0 < retry_after_ms <= 24 * 3600 * 1000, raw.headers
    assert retry_after_s == math.ceil(retry_after_ms / 1000), raw.headers
    assert await messages(http, user, chat_id) == before

    status = user_day_budget(await usage_of(http, user))
    assert (number(status, "used_tokens"), number(status, "remaining_tokens")) == (used, 0), status
    assert status["reset_time"] == reset, status


async def test_a_cached_answer_is_accounted_as_cached_tokens(
    mesh: Stack, http: httpx.AsyncClient, embedding_service: tuple[str, LoggedProcess]
) -> None:
    user = new_user()
    generated = await chat(http, user, QUESTION, max_tokens=48)
    prompt, completion = answered(generated)
    assert not generated.last.get("cached") and completion > 0
    assert generated.last["finish_reason"] == "FINISH_REASON_STOP", generated.last

    async def kept() -> bool:
        return await cache_entries(embedding_service[0], COLLECTION, {"owner": user}) == 1

    await eventually(kept, "the first answer was never kept in the cache")

    cached = await chat(http, user, QUESTION, max_tokens=48)
    assert cached.status == 200 and cached.last.get("cached") is True, cached.last
    assert cached.text == generated.text

    row = today_row(await usage_of(http, user))
    assert number(row, "requests") == 2, row
    assert number(row, "prompt_tokens") == prompt, "the cached answer charged no prompt"
    assert number(row, "completion_tokens") == completion, "the cached answer added no completion tokens"
    assert number(row, "cached_tokens") == completion, row
    budget = user_day_budget(await usage_of(http, user))
    assert number(budget, "used_tokens") == prompt + completion, "cached tokens are charged nothing"


async def test_a_retried_completion_is_recorded_once(
    mesh: Stack, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    user = new_user()
    opening = await chat(http, user, "Name a fruit.", skip_cache=True)
    opening_tokens = answered(opening)
    chat_id = opening.first["chat_id"]
    request_id = str(uuid.uuid4())
    first = await chat(http, user, "Name a colour.", chat_id, request_id=request_id, skip_cache=True)
    again = await chat(http, user, "Name a colour.", chat_id, request_id=request_id, skip_cache=True)
    assert again.last["assistant_message_id"] == first.last["assistant_message_id"]
    assert answered(again) == answered(first)

    row = today_row(await usage_of(http, user))
    assert number(row, "requests") == 2, "the chat's first turn and one record of the retried turn"
    assert number(row, "completion_tokens") == opening_tokens[1] + answered(first)[1], row
    records = await db.fetchval(
        "SELECT COUNT(*) FROM usage_records WHERE user_id = $1 AND message_id = $2",
        user,
        uuid.UUID(first.last["assistant_message_id"]),
    )
    assert records == 1
    assert len(await messages(http, user, chat_id)) == 4


async def test_users_see_only_their_own_usage_and_admins_see_and_budget_everyone(
    mesh: Stack, http: httpx.AsyncClient
) -> None:
    alice, bob = new_user(), new_user()
    alice_tokens = sum(answered(await chat(http, alice, "Name a fruit.", skip_cache=True)))
    bob_tokens = sum(answered(await chat(http, bob, "Name a tree.", skip_cache=True, max_tokens=4)))

    mine = await usage_of(http, alice)
    assert (mine["user_id"], mine["group"], mine.get("admin", False)) == (alice, GROUP, False)
    assert {row.get("user_id", "") for row in mine["usage"]} == {""}, "a user's rows are their own"
    row = today_row(mine)
    assert number(row, "prompt_tokens") + number(row, "completion_tokens") == alice_tokens

    for method, path in (("GET", "/admin/usage"), ("GET", "/admin/budgets"), ("PUT", "/admin/budgets")):
        body = {
            "scope": "BUDGET_SCOPE_USER",
            "subject": bob,
            "period": "BUDGET_PERIOD_DAY",
            "limit_tokens": 1,
        }
        refused = await http.request(method, path, headers=headers(alice), json=body)
        assert refused.status_code == 403, (method, path, refused.text)
    refused = await http.get("/admin/usage", params={"user_id": bob}, headers=headers(alice))
    assert refused.status_code == 403, refused.text

    team = await http.get("/admin/usage", headers=headers("boss", admin=True))
    assert team.status_code == 200, team.text
    by_user = {
        row["user_id"]: (row["group"], number(row, "prompt_tokens") + number(row, "completion_tokens"))
        for row in team.json()["usage"]
        if row["user_id"] in (alice, bob)
    }
    assert by_user == {alice: (GROUP, alice_tokens), bob: (GROUP, bob_tokens)}
    only_bob = await http.get("/admin/usage", params={"user_id": bob}, headers=headers("boss", admin=True))
    assert {row["user_id"] for row in only_bob.json()["usage"]} == {bob}, only_bob.text

    # A budget Bob has already used up refuses him at once, on whichever replica he reaches.
    await set_budget(http, bob, bob_tokens)
    listed = await http.get("/admin/budgets", headers=headers("boss", admin=True))
    assert listed.status_code == 200, listed.text
    bobs = [b for b in listed.json()["budgets"] if b["subject"] == bob]
    assert [(number(b, "limit_tokens"), number(b, "used_tokens"), b["overridden"]) for b in bobs] == [
        (bob_tokens, bob_tokens, True)
    ], bobs
    defaults = [b for b in listed.json()["budgets"] if b["subject"] == "*"]
    assert len(defaults) == 4 and all(number(b, "limit_tokens") == 0 for b in defaults), defaults
    for _ in mesh.replicas:
        refused_turn = await chat(http, bob, "Name another tree.", skip_cache=True)
        assert refused_turn.status == 429 and "daily token budget" in refused_turn.last["message"]

    cleared = await set_budget(http, bob, 0, clear=True)
    assert number(cleared, "limit_tokens") == 0 and not cleared.get("overridden", False), cleared
    listed = await http.get("/admin/budgets", headers=headers("boss", admin=True))
    assert [b for b in listed.json()["budgets"] if b["subject"] == bob] == []
    answered(await chat(http, bob, "Name another tree.", skip_cache=True, max_tokens=4))


async def test_the_openai_api_records_its_completions_as_openai(
    mesh: Stack, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    user = new_user()
    body = {
        "model": TEST_MODEL,
        "messages": [{"role": "user", "content": "Name a planet."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    reply = await http.post("/v1/chat/completions", json=body, headers=headers(user))
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]

    records = await db.fetch(
        "SELECT kind, model, prompt_tokens, completion_tokens, cached_tokens, user_group, chat_id"
        " FROM usage_records WHERE user_id = $1",
        user,
    )
    assert [dict(r) for r in records] == [
        {
            "kind": "openai",
            "model": TEST_MODEL,
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "cached_tokens": 0,
            "user_group": GROUP,
            "chat_id": None,
        }
    ]
    row = today_row(await usage_of(http, user))
    assert number(row, "requests") == 1 and number(row, "completion_tokens") == usage["completion_tokens"]


def seconds(duration: str) -> float:
    """An `x-ratelimit-reset-tokens` duration (`6h0m0s`, `45s`, `120ms`) in seconds."""
    if duration.endswith("ms"):
        return int(duration[:-2]) / 1000
    found = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+)s", duration)
    assert found, duration
    hours, minutes, secs = (int(part or 0) for part in found.groups())
    return hours * 3600 + minutes * 60 + secs


def to_midnight(moment: datetime) -> float:
    midnight = datetime.combine(moment.date() + timedelta(days=1), datetime.min.time(), UTC)
    return (midnight - moment).total_seconds()


async def test_responses_carry_the_token_headers_of_the_most_constraining_budget(
    mesh: Stack, http: httpx.AsyncClient
) -> None:
    user = new_user()
    unlimited = await http.get("/chats", headers=headers(user))
    assert unlimited.status_code == 200 and "x-ratelimit-limit-tokens" not in unlimited.headers

    limit = 100_000
    await set_budget(http, user, limit)
    seen: list[tuple[datetime, httpx.Headers]] = []  # (when asked, the headers) of every GET /chats

    async def shows(remaining: int) -> bool:
        before = datetime.now(UTC)
        reply = await http.get("/chats", headers=headers(user))
        seen.append((before, reply.headers))
        return reply.status_code == 200 and reply.headers.get("x-ratelimit-remaining-tokens") == str(
            remaining
        )

    # The replica that did not store the budget may answer from what it read a moment before.
    async def shows_limit() -> bool:
        return await shows(limit)

    await eventually(shows_limit, f"GET /chats never showed {limit} tokens remaining")
    after = datetime.now(UTC)
    before, sent = seen[-1]
    assert sent["x-ratelimit-limit-tokens"] == str(limit), sent
    reset = seconds(sent["x-ratelimit-reset-tokens"])
    assert to_midnight(after) - 1 <= reset <= to_midnight(before), sent

    first = await chat(http, user, "Name a colour.", skip_cache=True)
    used = sum(answered(first))
    assert first.headers["x-ratelimit-limit-tokens"] == str(limit), first.headers
    assert first.headers["x-ratelimit-remaining-tokens"] == str(limit), "told before it generated"

    async def shows_use() -> bool:
        return await shows(limit - used)

    await eventually(shows_use, f"GET /chats never showed {limit - used} tokens remaining")

    openai = await http.post(
        "/v1/chat/completions",
        json={"model": TEST_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers=headers(user),
    )
    assert openai.status_code == 200, openai.text
    used += openai.json()["usage"]["total_tokens"]
    # A unary answer's headers go out with the answer, after its use was recorded (on this replica).
    assert openai.headers["x-ratelimit-limit-tokens"] == str(limit), openai.headers
    assert openai.headers["x-ratelimit-remaining-tokens"] == str(limit - used), openai.headers

    await set_budget(http, user, used)
    refused = await chat(http, user, "Name another colour.", skip_cache=True)
    assert refused.status == 429, refused.events
    assert refused.headers["x-ratelimit-limit-tokens"] == str(used), refused.headers
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0", refused.headers
    assert 0 < seconds(refused.headers["x-ratelimit-reset-tokens"]) <= 24 * 3600, refused.headers


async def test_retries_sent_at_once_are_recorded_once(
    mesh: Stack, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    user = new_user()
    opening = await chat(http, user, "Name a fruit.", skip_cache=True)
    chat_id = opening.first["chat_id"]
    request_id = str(uuid.uuid4())
    attempts = await asyncio.gather(
        *(
            chat(http, user, "Name a colour.", chat_id, request_id=request_id, skip_cache=True)
            for _ in range(3)
        )
    )
    for attempt in attempts:
        answered(attempt)  # each streamed the (one) reply to its end
    replies = {attempt.last["assistant_message_id"] for attempt in attempts}
    assert len(replies) == 1, [attempt.events for attempt in attempts]
    records = await db.fetch(
        "SELECT message_id FROM usage_records WHERE user_id = $1 AND chat_id = $2 ORDER BY created_at",
        user,
        uuid.UUID(chat_id),
    )
    assert [str(r["message_id"]) for r in records] == [opening.last["assistant_message_id"], *replies]
    assert number(today_row(await usage_of(http, user)), "requests") == 2


async def test_a_summary_is_recorded_as_such_and_charged_to_the_chats_owner(
    mesh: Stack, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    user = new_user()
    first = await chat(
        http, user, "Name a fruit.", history_strategy="HISTORY_STRATEGY_SUMMARY", skip_cache=True
    )
    chat_id = first.first["chat_id"]
    # The test settings fold older turns once 4 messages are older than the 2 kept: by the fourth turn.
    for question in ("Name a colour.", "Name a tree.", "Name a river."):
        answered(await chat(http, user, question, chat_id, skip_cache=True))
    summaries = await db.fetch(
        "SELECT user_group, model, prompt_tokens, completion_tokens, request_key FROM usage_records"
        " WHERE user_id = $1 AND kind = 'summary'",
        user,
    )
    assert summaries, "no summary was recorded"
    for summary in summaries:
        assert (summary["user_group"], summary["model"]) == (GROUP, TEST_MODEL), dict(summary)
        assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0, dict(summary)
    charged = await db.fetchval(
        "SELECT SUM(prompt_tokens + completion_tokens) FROM usage_records WHERE user_id = $1", user
    )
    assert number(user_day_budget(await usage_of(http, user)), "used_tokens") == charged


async def test_a_default_budget_from_the_settings_applies_to_everyone_until_an_override_lifts_it(
    tmp_path: Path, inference_address: str
) -> None:
    async with (
        fresh_postgres_database() as url,
        chat_stack(
            inference_address,
            url,
            envoy_dir=tmp_path,
            gateway={"rate_limit_per_s": 0},
            budget_user_daily_tokens=1,
        ) as stack,
        httpx.AsyncClient(base_url=stack.envoy.base_url, timeout=60.0) as client,
    ):
        user = new_user()
        # Nothing used yet is under any limit: the first turn runs, and uses the day's budget up.
        used = sum(answered(await chat(client, user, "Name a colour.", skip_cache=True)))
        budget = user_day_budget(await usage_of(client, user))
        assert (number(budget, "limit_tokens"), budget.get("overridden", False)) == (1, False), budget

        refused = await chat(client, user, "Name another.", skip_cache=True)
        assert refused.status == 429, refused.events
        assert refused.last["message"].startswith(
            f"your daily token budget of 1 tokens is used up ({used} used)"
        ), refused.last

        listed = await client.get("/admin/budgets", headers=headers("boss", admin=True))
        defaults = {
            (b["scope"], b["period"]): number(b, "limit_tokens")
            for b in listed.json()["budgets"]
            if b["subject"] == "*"
        }
        assert defaults == {
            ("BUDGET_SCOPE_USER", "BUDGET_PERIOD_DAY"): 1,
            ("BUDGET_SCOPE_USER", "BUDGET_PERIOD_MONTH"): 0,
            ("BUDGET_SCOPE_GROUP", "BUDGET_PERIOD_DAY"): 0,
            ("BUDGET_SCOPE_GROUP", "BUDGET_PERIOD_MONTH"): 0,
        }, listed.text

        # An override of 0 is no limit for this user; everyone else keeps the default.
        await set_budget(client, user, 0)
        answered(await chat(client, user, "Name another.", skip_cache=True))
        other = new_user()
        answered(await chat(client, other, "Name a colour.", skip_cache=True))
        assert (await chat(client, other, "Name another.", skip_cache=True)).status == 429
