"""Schemathesis against the live mesh behind Envoy: requests generated from the OpenAPI document the
gateway serves (`/openapi.json`), seeded and bounded; no response may be a 5xx, and every response must
match the document (status, content type, body schema), for callers with a token and without one.

Two passes. Each operation alone, with data generated from its schema: the limits the service enforces
are in the document (lengths, ranges, required fields), so most requests get past validation, and page
tokens are drawn as the cursors they decode to (`m|<seq>`, `c|<time>|<chat>`) with what may stand in
each part, not as random text that never decodes. Then sequences that follow the document's links
(a new chat's id to its history, updates, completions and jobs; a job's id to its reads; a page's
token to the next page), so the fuzzing reaches real chats and jobs instead of 404s.

Everything runs derandomized (Hypothesis derives its seed from the test, no example database): the same
requests every run, the linked ones with the ids the replies hand out; nothing is drawn by chance.
Completions would run as long as the generated `max_tokens` says; a hook bounds it, and sets the OpenAI
API's `model` to the one served, so the run stays short without narrowing what the document accepts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks

from gateway import EnvoyProcess
from tests.support.chat import token_for
from tests.support.databases import fresh_postgres_database
from tests.support.nats import run_nats
from tests.support.stack import chat_stack

pytestmark = pytest.mark.e2e

EXAMPLES = 25
"""Generated requests per operation with a token (was 12, which found none of the 500s of page tokens,
seeds of 2^63 and more, or NUL characters: with the limits in the document and the cursors drawn as
they decode, 25 find each of them); without one, every call is a 401 however it is made."""
UNAUTHENTICATED_EXAMPLES = 5
SCENARIOS = 15
STEPS = 5
"""Linked sequences, and the calls in each."""
MAX_TOKENS = 4

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.ignored_auth,
]
"""What the issue asks (no 5xx, responses as documented, a token required), not schemathesis's whole
default set: its positive-data check would count every opaque `page_token` or non-UUID `chat_id` the
document cannot rule out as an error, and its negative-data check every unknown JSON field the native
API's transcoder ignores (proto3 JSON mapping; the OpenAI API rejects them)."""

SETTINGS = hypothesis.settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


@dataclass
class Fuzzed:
    envoy: EnvoyProcess
    model: str


@pytest.fixture(scope="module")
async def fuzzed_gateway(
    tmp_path_factory: pytest.TempPathFactory, inference_address: str
) -> AsyncIterator[Fuzzed]:
    with run_nats(tmp_path_factory.mktemp("nats")) as nats:
        async with (
            fresh_postgres_database() as url,
            chat_stack(
                inference_address,
                url,
                envoy_dir=tmp_path_factory.mktemp("envoy"),
                # No rate limit in the way: a 429 is allowed by the document, but it would hide the rest.
                gateway={"rate_limit_per_s": 0},
                jobs_nats_url=nats.url,
                jobs_stream="JOBS_FUZZ",
            ) as stack,
        ):
            async with httpx.AsyncClient(base_url=stack.envoy.base_url) as http:
                reply = await http.get("/v1/models", headers={"authorization": f"Bearer {token_for('x')}"})
                model = reply.json()["data"][0]["id"]
            yield Fuzzed(stack.envoy, model)


def _bounded(body: Any, model: str) -> Any:
    """`body` with any generation it asks for kept short, and OpenAI requests for the served model,
    ending with the user's message."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), (int, float)) and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if "content" in body and "max_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
        if "messages" in body:
            body["model"] = model
            # The one rule the document cannot say: the conversation ends with the user's message.
            if (
                isinstance(body["messages"], list)
                and body["messages"]
                and isinstance(body["messages"][-1], dict)
            ):
                body["messages"][-1]["role"] = "user"
            if "max_tokens" not in body and "max_completion_tokens" not in body:
                body["max_tokens"] = MAX_TOKENS
    return body


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


_SEQUENCES = st.one_of(
    st.integers(min_value=-1, max_value=2**40).map(str),
    st.integers(min_value=2**63 - 1, max_value=2**70).map(str),  # BIGINT's end and past it
    # Digits as str.isdigit reads them that int() does not ('²', '①'), and those of other scripts ('٣').
    st.text(alphabet=st.characters(categories=["No"]).filter(str.isdigit), min_size=1, max_size=3),
    st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=3),
    st.text(max_size=6),
)
_TIMES = st.one_of(
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda when: when.isoformat()),
    st.text(max_size=8),
)
_JUNK = st.one_of(
    st.builds(lambda kind, rest: _token(f"{kind}|{rest}"), st.text(max_size=2), st.text(max_size=12)),
    st.text(max_size=16),
)
PAGE_TOKENS = {
    "GET /chats": st.one_of(
        st.builds(lambda when, chat: _token(f"c|{when}|{chat}"), _TIMES, st.uuids().map(str)), _JUNK
    ),
    # Its sequence number may be any text: junk is drawn there.
    "GET /chat/{chat_id}/messages": st.builds(lambda seq: _token(f"m|{seq}"), _SEQUENCES),
}
"""Each listing's cursors as they decode: a chat's time and id, a message's sequence number, with what
may stand in each part (times without a zone or out of range, digits of other scripts, numbers past 64
bits), and junk."""

SEEDS = st.one_of(
    st.integers(min_value=2**63 - 1, max_value=2**64 - 1),
    st.integers(min_value=2**63 - 1, max_value=2**64 - 1).map(str),
)
"""The top half of the seeds the contract takes (uint64; int64 in the OpenAI API), which the document's
range rarely draws: a signed 64-bit column or sampler must not make them a 500."""


def _schema(fuzzed: Fuzzed, authenticated: bool, user: str | None = None, chat_id: str | None = None) -> Any:
    document = httpx.get(f"{fuzzed.envoy.base_url}/openapi.json").raise_for_status().json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=fuzzed.envoy.base_url, request_timeout=120)
    schema.config.generation.update(max_examples=EXAMPLES, deterministic=True, database="none")
    if authenticated:
        user = user or new_user()

        @schema.auth()
        class Bearer:
            def get(self, case: Any, ctx: Any) -> str:
                assert user is not None
                return token_for(user)

            def set(self, case: Any, data: str, ctx: Any) -> None:
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    @schema.hook
    def map_body(ctx: Any, body: Any) -> Any:
        return _bounded(body, fuzzed.model)

    @schema.hook
    def flatmap_body(ctx: Any, body: Any) -> Any:
        if not isinstance(body, dict) or "seed" not in body:
            return st.just(body)
        return st.one_of(st.just(body), SEEDS.map(lambda seed: {**body, "seed": seed}))

    @schema.hook
    def flatmap_query(ctx: Any, query: Any) -> Any:
        tokens = PAGE_TOKENS.get(ctx.operation.label)
        if tokens is None or not isinstance(query, dict):
            return st.just(query)
        return tokens.map(lambda token: {**query, "page_token": token})

    if chat_id is not None:
        # Half the calls on a chat go to a real one (kept: never deleted), so that what is checked after
        # the chat is found (a job's seed, a page of messages) is reached without links too.
        @schema.hook
        def flatmap_path_parameters(ctx: Any, path: Any) -> Any:
            if not isinstance(path, dict) or "chat_id" not in path or ctx.operation.method == "delete":
                return st.just(path)
            return st.one_of(st.just(path), st.just({**path, "chat_id": chat_id}))

    return schema


def new_user() -> str:
    return f"fuzz-{uuid.uuid4().hex[:8]}"


def new_chat(fuzzed: Fuzzed, user: str) -> str:
    """The id of a new chat of `user` (no question asked: its stream is the one event naming it)."""
    headers = {"authorization": f"Bearer {token_for(user)}"}
    reply = httpx.post(f"{fuzzed.envoy.base_url}/chat", json={"title": "fuzzed"}, headers=headers)
    assert reply.status_code == 200, reply.text
    data = next(line for line in reply.text.splitlines() if line.startswith("data:"))
    return str(json.loads(data[5:])["chat_id"])


@dataclass
class Seen:
    """What the fuzzing got: the failures, one line each, and the statuses each operation answered."""

    failures: list[str] = field(default_factory=list)
    statuses: dict[str, set[int]] = field(default_factory=dict)

    def served(self) -> set[str]:
        return {label for label, codes in self.statuses.items() if codes & {200, 202}}


def _fuzz(schema: Any, check: Callable[[Any, Any], None] | None = None, examples: int = EXAMPLES) -> Seen:
    """Run every operation of `schema` with its generated cases."""
    seen = Seen()
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            _fuzz_operation(operation, seen.statuses.setdefault(operation.label, set()), check, examples)
        # Every operation is tried, and all failures reported together (schemathesis raises a group).
        except (Exception, BaseExceptionGroup) as exc:
            seen.failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:2000]}")
    return seen


def _fuzz_operation(
    operation: Any, statuses: set[int], check: Callable[[Any, Any], None] | None, examples: int
) -> None:
    @hypothesis.settings(SETTINGS, max_examples=examples)
    @hypothesis.given(case=operation.as_strategy())
    def run(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS)
        statuses.add(response.status_code)
        if check is not None:
            check(case, response)

    run()


def _fuzz_linked(schema: Any) -> Seen:
    """Run sequences of calls that follow the document's links."""
    seen = Seen()
    # Valid requests only: a sequence goes on from a success (the stateless pass sends the invalid ones).
    schema.config.generation.update(modes=[GenerationMode.POSITIVE])
    # Schemathesis reads `request_id` (the client's retry key) as a reference to a "Request" resource
    # nothing creates, and so never starts a sequence with an operation that takes one (POST /chat,
    # completions, jobs); references to what no operation creates are dropped.
    graph = schema.analysis.dependency_graph
    produced = {output.resource.name for node in graph.operations.values() for output in node.outputs}
    for node in graph.operations.values():
        node.inputs = [slot for slot in node.inputs if slot.resource.name in produced]

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def after_call(self, response: Any, case: Any) -> None:
            seen.statuses.setdefault(case.operation.label, set()).add(response.status_code)

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    try:
        Machine.run(settings=hypothesis.settings(SETTINGS, max_examples=SCENARIOS, stateful_step_count=STEPS))
    except (Exception, BaseExceptionGroup) as exc:
        seen.failures.append(f"{type(exc).__name__}: {str(exc)[:4000]}")
    return seen


async def test_authenticated_calls_never_fail_on_the_server_and_match_the_document(
    fuzzed_gateway: Fuzzed,
) -> None:
    user = new_user()
    schema = _schema(fuzzed_gateway, True, user, new_chat(fuzzed_gateway, user))
    seen = await asyncio.to_thread(_fuzz, schema)
    assert not seen.failures, "\n\n".join(seen.failures)
    # Every operation was called, and the generated calls got through to the service (not only 4xx).
    assert len(seen.statuses) == len(list(schema.get_all_operations())), seen.statuses
    served = {"POST /chat", "GET /chats", "GET /v1/models", "DELETE /cache", "POST /v1/chat/completions"}
    assert served <= seen.served(), seen.statuses


async def test_linked_calls_reach_real_chats_and_jobs_and_never_fail_on_the_server(
    fuzzed_gateway: Fuzzed,
) -> None:
    seen = await asyncio.to_thread(_fuzz_linked, _schema(fuzzed_gateway, authenticated=True))
    assert not seen.failures, "\n\n".join(seen.failures)
    # Calls that only a real chat answers with success were made, with ids from earlier replies. (Which
    # ones a run reaches depends on the replies too, ids and all, so the run names them, not the test.)
    on_a_chat = {
        "POST /chat/{chat_id}/completion",
        "GET /chat/{chat_id}/messages",
        "PATCH /chat/{chat_id}",
        "DELETE /chat/{chat_id}",
        "POST /chat/{chat_id}/jobs",
    }
    assert "POST /chat" in seen.served() and on_a_chat & seen.served(), seen.statuses
    print("linked calls answered with success:", sorted(seen.served()))


async def test_calls_without_a_token_are_refused_as_the_document_says(fuzzed_gateway: Fuzzed) -> None:
    def refused(case: Any, response: Any) -> None:
        assert response.status_code == 401, (case.method, case.path, response.status_code)

    schema = _schema(fuzzed_gateway, authenticated=False)
    seen = await asyncio.to_thread(_fuzz, schema, refused, UNAUTHENTICATED_EXAMPLES)
    assert not seen.failures, "\n\n".join(seen.failures)
    assert set().union(*seen.statuses.values()) == {401}, seen.statuses
