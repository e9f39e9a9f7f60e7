"""The whole mesh behind the real Envoy gateway, driven over REST (HTTP/1.1, httpx) and gRPC.

One stack for the module: the inference service, two chat replicas on one fresh PostgreSQL database,
and Envoy in front with a low per-user rate limit and fast health checks. Tests that kill something
or need other keys get their own replicas and Envoy (on the module's engine, unless they kill the
engine), so no test depends on the order the tests run in.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chat_service.storage.base import Lease
from chat_service.storage.sql import open_sql_store
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.common.auth import JwtKeys, issue_token
from chatmesh.inference.v1 import inference_pb2 as ipb
from chatmesh.inference.v1 import inference_pb2_grpc
from chatmesh.keygen import write_rs256_key_pair
from gateway import EnvoyProcess, render_envoy_config, run_envoy, validate_config
from gateway.api import default_descriptor_path
from tests.support.chat import TEST_SECRET, ChatClient, bearer, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import LoggedProcess
from tests.support.services import COUNTING_SYSTEM_PROMPT, LONG, cache_entries
from tests.support.stack import (
    GATEWAY_BURST,
    GATEWAY_RATE_PER_S,
    chat_service,
    chat_stack,
    gateway_settings,
    inference_service,
)
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

RATE_PER_S = GATEWAY_RATE_PER_S
BURST = GATEWAY_BURST


@dataclass
class Mesh:
    """The running module stack."""

    envoy: EnvoyProcess
    replicas: dict[str, LoggedProcess]
    inference: str
    database_url: str


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, inference_address: str) -> AsyncIterator[Mesh]:
    inference = inference_address  # the session's engine (tests/conftest.py)
    # The first replica migrates the fresh database; the second starts on the migrated schema.
    async with (
        fresh_postgres_database() as url,
        chat_stack(inference, url, replicas=2, envoy_dir=tmp_path_factory.mktemp("envoy")) as stack,
    ):
        replicas = {replica.address: replica.process for replica in stack.replicas}
        yield Mesh(stack.envoy, replicas, inference, url)


@pytest.fixture
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.envoy.base_url, timeout=60.0) as client:
        yield client


@pytest.fixture
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.envoy.listen_address) as channel:
        yield channel


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


@dataclass
class Event:
    """One server-sent event and the network read it arrived in (0, 1, ...): events that arrive in
    different reads were sent separately, as they were produced."""

    data: dict[str, Any]
    read: int


@dataclass
class Stream:
    """A whole REST completion: HTTP status, content type and every event."""

    status: int
    content_type: str
    events: list[Event] = field(default_factory=list)

    @property
    def first(self) -> dict[str, Any]:
        return self.events[0].data

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1].data

    @property
    def deltas(self) -> list[Event]:
        return [e for e in self.events if "delta" in e.data]

    @property
    def text(self) -> str:
        return "".join(e.data["delta"] for e in self.deltas)


async def sse_events(response: httpx.Response) -> AsyncIterator[Event]:
    """Parse `data: {json}` events off the wire as they arrive (each HTTP/1.1 chunk is one read)."""
    pending = ""
    read = -1

    def parse(block: str) -> dict[str, Any]:
        lines = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        return json.loads("\n".join(lines))  # type: ignore[no-any-return]

    async for text in response.aiter_text():
        read += 1
        *blocks, pending = (pending + text).replace("\r\n", "\n").split("\n\n")
        for block in blocks:
            if "data:" in block:
                yield Event(parse(block), read)
    if "data:" in pending:
        yield Event(parse(pending), read)


async def post_stream(client: httpx.AsyncClient, path: str, user: str, body: dict[str, Any]) -> Stream:
    async with client.stream("POST", path, json=body, headers=bearer(user)) as response:
        stream = Stream(response.status_code, response.headers.get("content-type", ""))
        if response.status_code != 200:
            await response.aread()
            stream.events.append(Event(response.json(), 0))
            return stream
        stream.events = [event async for event in sse_events(response)]
    return stream


def check_completion_shape(stream: Stream) -> None:
    assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
    assert stream.first["chat_id"] and stream.first["user_message_id"], stream.first
    assert stream.deltas, "the reply streams as delta events"
    assert all(set(e.data) == {"delta"} for e in stream.events[1:-1])
    assert stream.last["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH"), stream.last
    assert stream.last["usage"]["completion_tokens"] > 0 and stream.last["usage"]["prompt_tokens"] > 0
    assert stream.last["assistant_message_id"]


async def upstream_requests(envoy: EnvoyProcess) -> int:
    stats = await envoy.stats(r"^cluster\.chat\.upstream_rq_total$")
    return stats.get("cluster.chat.upstream_rq_total", 0)


async def host_stats(envoy: EnvoyProcess) -> dict[str, dict[str, str]]:
    """Per-replica values of the admin /clusters page: {"127.0.0.1:port": {"rq_total": "3", ...}}."""
    status, body = await envoy.admin_get("/clusters")
    assert status == 200, body
    hosts: dict[str, dict[str, str]] = {}
    for line in body.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "chat" and re.fullmatch(r".+:\d+", parts[1]):
            hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
    return hosts


async def test_rest_conversation_create_continue_list_page_and_delete(http: httpx.AsyncClient) -> None:
    ada = new_user()
    created = await post_stream(
        http, "/chat", ada, {"content": "My name is Ada.", "max_tokens": 16, "temperature": 0}
    )
    check_completion_shape(created)
    chat_id = created.first["chat_id"]

    second = await post_stream(
        http,
        f"/chat/{chat_id}/completion",
        ada,
        {"content": "What is my name?", "max_tokens": 8, "temperature": 0},
    )
    check_completion_shape(second)
    assert second.first["chat_id"] == chat_id
    # The prompt carried the earlier turns: greedy decoding names Ada (deterministic for this model).
    assert "Ada" in second.text, second.text

    listed = (await http.get("/chats", headers=bearer(ada))).json()
    assert [c["chat_id"] for c in listed["chats"]] == [chat_id]
    assert listed["chats"][0]["title"] == "My name is Ada."

    pages: list[dict[str, Any]] = []
    token = ""
    while True:
        params = {"page_size": "2", **({"page_token": token} if token else {})}
        reply = await http.get(f"/chat/{chat_id}/messages", params=params, headers=bearer(ada))
        assert reply.status_code == 200, reply.text
        page = reply.json()
        assert len(page["messages"]) <= 2
        pages.append(page)
        token = page.get("next_page_token", "")
        if not token:
            break
    messages = [m for page in pages for m in page["messages"]]
    assert len(pages) == 2 and len(messages) == 4
    assert [m["role"] for m in messages] == ["ROLE_USER", "ROLE_ASSISTANT"] * 2
    assert [m["content"] for m in messages] == [
        "My name is Ada.",
        created.text,
        "What is my name?",
        second.text,
    ]
    assert messages[0]["message_id"] == created.first["user_message_id"]
    assert messages[3]["message_id"] == second.last["assistant_message_id"]

    deleted = await http.delete(f"/chat/{chat_id}", headers=bearer(ada))
    assert (deleted.status_code, deleted.json()) == (200, {})
    gone = await http.get(f"/chat/{chat_id}/messages", headers=bearer(ada))
    assert gone.status_code == 404 and gone.json()["code"] == "NOT_FOUND"
    assert (await http.get("/chats", headers=bearer(ada))).json().get("chats", []) == []


async def test_the_openapi_document_is_served_without_a_token(http: httpx.AsyncClient) -> None:
    reply = await http.get("/openapi.json")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    document = reply.json()
    assert document == json.loads((default_descriptor_path().parent / "openapi.json").read_text())
    assert {"/chat", "/chats", "/chat/{chat_id}/completion"} <= set(document["paths"])


async def test_grpc_clients_call_the_same_port(channel: grpc.aio.Channel) -> None:
    client = ChatClient(channel)
    created = await client.create("Say hello.", max_tokens=8, temperature=0)
    assert created.last is not None and created.deltas
    await client.complete(created.chat_id, "Again.", max_tokens=4)
    assert [c.chat_id for c in (await client.list()).chats] == [created.chat_id]
    assert len(await client.all_messages(created.chat_id)) == 4


async def test_completion_reaches_the_client_while_the_model_is_still_generating(
    http: httpx.AsyncClient,
) -> None:
    user = new_user()
    body = {
        "content": "Count to 300.",
        "system_prompt": COUNTING_SYSTEM_PROMPT,
        "max_tokens": 60,
        "temperature": 0,
    }
    async with http.stream("POST", "/chat", json=body, headers=bearer(user)) as response:
        events = sse_events(response)
        chat_id = (await anext(events)).data["chat_id"]
        first_delta = await anext(events)
        assert "delta" in first_delta.data
        # The first delta is in our hands while the reply is still being generated: the assistant's
        # message is only stored once the model has finished.
        history = await http.get(f"/chat/{chat_id}/messages", headers=bearer(user))
        assert [m["role"] for m in history.json()["messages"]] == ["ROLE_USER"]
        rest = [event async for event in events]
    final = rest[-1]
    assert "finish_reason" in final.data, final.data
    deltas = [first_delta, *(e for e in rest if "delta" in e.data)]
    assert len(deltas) >= 20
    # Token by token, not in one piece: the deltas came in many separate reads, all before the one
    # that brought the final event.
    delta_reads = sorted({e.read for e in deltas})
    assert len(delta_reads) >= 10, f"the deltas arrived in only {len(delta_reads)} reads"
    assert delta_reads[9] < final.read
    stored = (await http.get(f"/chat/{chat_id}/messages", headers=bearer(user))).json()["messages"]
    assert stored[-1]["content"] == "".join(e.data["delta"] for e in deltas)


@pytest.fixture
async def doomed_stack(tmp_path: Path) -> AsyncIterator[tuple[EnvoyProcess, LoggedProcess]]:
    """Envoy -> one replica (SQLite) -> an inference service the test may kill. Yields (envoy, engine)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    with (
        inference_service() as engine,
        chat_service(url, engine.address) as replica,
    ):
        async with run_envoy(gateway_settings([replica.address]), tmp_path / "envoy") as envoy:
            yield envoy, engine.process


async def test_failure_after_the_first_event_arrives_as_an_error_event(
    doomed_stack: tuple[EnvoyProcess, LoggedProcess],
) -> None:
    envoy, engine = doomed_stack
    user = new_user()
    body = {"content": "Count to 300.", "system_prompt": COUNTING_SYSTEM_PROMPT, "max_tokens": 300}
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=envoy.base_url, timeout=60.0) as http:
        async with http.stream("POST", "/chat", json=body, headers=bearer(user)) as response:
            assert response.status_code == 200
            async for event in sse_events(response):
                events.append(event.data)
                if len(events) == 3:
                    engine.kill()  # the engine dies mid-stream
        # The status line went out with the first event, so the failure is the stream's last event;
        # over HTTP/1.1 the response then ends normally (the grpc-status trailer is not forwarded).
        assert "delta" in events[1]
        error = events[-1]["error"]
        assert error["code"] == "UNAVAILABLE" and error["message"], events[-1]
        chat_id = events[0]["chat_id"]
        history = (await http.get(f"/chat/{chat_id}/messages", headers=bearer(user))).json()
    assert [m["role"] for m in history["messages"]] == ["ROLE_USER"], "no broken reply is stored"


async def test_calls_without_a_valid_token_never_reach_a_replica(
    mesh: Mesh, http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    denied_before = (await mesh.envoy.stats(r"jwt_authn\.denied$")).get("http.public.jwt_authn.denied", 0)
    upstream_before = await upstream_requests(mesh.envoy)

    missing = await http.get("/chats")
    assert missing.status_code == 401
    assert missing.json() == {"code": "UNAUTHENTICATED", "message": "Jwt is missing"}
    assert missing.headers["www-authenticate"].startswith("Bearer")
    forged = bearer("alice", secret="not-the-server-secret-" + "y" * 30)
    for reply in (
        await http.get("/chats", headers=forged),
        await http.post("/chat", json={"content": "hi"}, headers=forged),
        await http.get("/chats", headers={"authorization": "Basic YWxpY2U6c2VjcmV0"}),
        await http.get("/models"),
        await http.get("/models", headers=forged),
        await http.patch(f"/chat/{uuid.uuid4()}", json={"model": "gemma-3-270m"}, headers=forged),
    ):
        assert reply.status_code == 401, reply.text
        assert reply.json()["code"] == "UNAUTHENTICATED"
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListChats(pb.ListChatsRequest(), metadata=tuple(forged.items()))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    denied = (await mesh.envoy.stats(r"jwt_authn\.denied$"))["http.public.jwt_authn.denied"]
    assert denied - denied_before == 8  # every call above, the models endpoints included
    assert await upstream_requests(mesh.envoy) == upstream_before, "a rejected call reached a replica"


async def test_another_users_chat_is_not_found(http: httpx.AsyncClient) -> None:
    alice, bob = new_user(), new_user()
    created = await post_stream(http, "/chat", alice, {"title": "secret plans"})
    chat_id = created.first["chat_id"]
    for reply in (
        await http.get(f"/chat/{chat_id}/messages", headers=bearer(bob)),
        await http.delete(f"/chat/{chat_id}", headers=bearer(bob)),
        await http.patch(f"/chat/{chat_id}", json={"title": "mine"}, headers=bearer(bob)),
    ):
        assert reply.status_code == 404, reply.text
        assert reply.json()["code"] == "NOT_FOUND" and "secret" not in reply.json()["message"]
    stolen = await post_stream(http, f"/chat/{chat_id}/completion", bob, {"content": "hi"})
    assert stolen.status == 404 and stolen.first["code"] == "NOT_FOUND"
    assert (await http.get("/chats", headers=bearer(alice))).json()["chats"][0]["title"] == "secret plans"


async def test_bad_input_is_400_with_a_message_naming_the_field(http: httpx.AsyncClient) -> None:
    user = new_user()
    chat_id = (await post_stream(http, "/chat", user, {"title": "target"})).first["chat_id"]
    empty = await post_stream(http, f"/chat/{chat_id}/completion", user, {"content": ""})
    assert empty.status == 400 and empty.content_type == "application/json"
    assert empty.first["code"] == "INVALID_ARGUMENT" and empty.first["message"].startswith("content"), (
        empty.first
    )
    big_page = await http.get("/chats", params={"page_size": "1000"}, headers=bearer(user))
    assert big_page.status_code == 400 and big_page.json()["message"].startswith("page_size")
    hot = await post_stream(http, f"/chat/{chat_id}/completion", user, {"content": "hi", "temperature": 5})
    assert hot.status == 400 and hot.first["message"].startswith("temperature")
    # Rejected by the transcoder, before any replica: unparseable JSON and unknown query parameters.
    broken = await http.post("/chat", content=b'{"content":', headers=bearer(user))
    assert broken.status_code == 400 and broken.json()["code"] == "INVALID_ARGUMENT"
    unknown = await http.get("/chats", params={"colour": "red"}, headers=bearer(user))
    assert unknown.status_code == 400 and "colour" in unknown.json()["message"]


async def test_unknown_paths_are_404_and_wrong_methods_405(
    http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    auth = bearer(new_user())
    for path in ("/nope", "/index.html", "/chats/extra/parts", "/chat/x/y/z"):
        reply = await http.get(path, headers=auth)
        assert reply.status_code == 404, path
        assert reply.json()["code"] == "NOT_FOUND"
    # `/` is the web page, for GET and HEAD only.
    assert (await http.get("/")).status_code == 200
    assert (await http.post("/", headers=auth)).status_code == 404
    for method, path, allowed in (
        ("PUT", "/chats", "GET"),
        ("GET", "/chat", "POST"),
        ("GET", f"/chat/{uuid.uuid4()}/completion", "POST"),
        ("POST", f"/chat/{uuid.uuid4()}/messages", "GET"),
        ("POST", f"/chat/{uuid.uuid4()}", "PATCH, DELETE"),
    ):
        reply = await http.request(method, path, headers=auth)
        assert reply.status_code == 405, (method, path, reply.text)
        assert reply.headers["allow"] == allowed and reply.json()["code"] == "UNIMPLEMENTED"
    # Health and reflection of the replicas are not exposed through the gateway.
    assert (await http.post("/grpc.health.v1.Health/Check")).status_code == 404
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_each_user_is_rate_limited_on_their_own(
    http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    greedy, other = new_user(), new_user()
    stub = chat_pb2_grpc.ChatServiceStub(channel)

    # One call at a time, so that the limiter answers in the order of the calls; every answer says
    # how many tokens the user's bucket has left (x-ratelimit-remaining).
    answers: list[tuple[int, int]] = []  # (HTTP status, tokens left)
    while not answers or answers[-1][0] == 200:
        assert len(answers) <= 10 * BURST, f"never rate limited: {answers}"
        reply = await http.get("/chats", headers=bearer(greedy))
        answers.append((reply.status_code, int(reply.headers["x-ratelimit-remaining"])))
    statuses = [status for status, _ in answers]
    assert statuses[-1] == 429, answers
    # A new user starts with a full bucket of BURST tokens ...
    assert answers[0] == (200, BURST - 1) and statuses.count(200) >= BURST, answers
    # ... each call that passes takes exactly one token (unless the bucket was refilled in between,
    # which only ever adds tokens) ...
    for (_, before), (_, after) in itertools.pairwise(answers[:-1]):
        assert after == before - 1 or after >= before, answers
    # ... and a call is refused only once the bucket is empty.
    assert answers[-2] == (200, 0) and answers[-1] == (429, 0), answers
    assert reply.json() == {"code": "RESOURCE_EXHAUSTED", "message": "local_rate_limited"}
    assert reply.headers["x-ratelimit-limit"] == str(BURST)

    # gRPC calls of the same user draw on the same, now empty, bucket: refused, or (if a refill came
    # in between) let through from the refill, not from a fresh bucket of BURST.
    call = stub.ListChats(pb.ListChatsRequest(), metadata=tuple(bearer(greedy).items()))
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    else:
        left = dict(await call.initial_metadata())["x-ratelimit-remaining"]
        assert int(left) < RATE_PER_S <= BURST - 1, left

    fresh = await http.get("/chats", headers=bearer(other))
    assert fresh.status_code == 200, "others are unaffected"
    assert fresh.headers["x-ratelimit-remaining"] == str(BURST - 1), "and have their own full bucket"


@dataclass
class ReplicaPair:
    """Two chat replicas of their own behind an Envoy of their own (on the module's engine and
    database), for a test that kills one."""

    envoy: EnvoyProcess
    replicas: dict[str, LoggedProcess]


@pytest.fixture
async def replica_pair(mesh: Mesh, tmp_path: Path) -> AsyncIterator[ReplicaPair]:
    with (
        chat_service(mesh.database_url, mesh.inference, migrate=False) as one,
        chat_service(mesh.database_url, mesh.inference, migrate=False) as two,
    ):
        async with run_envoy(gateway_settings([one.address, two.address]), tmp_path) as envoy:
            yield ReplicaPair(envoy, {one.address: one.process, two.address: two.process})


async def test_both_replicas_serve_and_losing_one_is_survivable(replica_pair: ReplicaPair) -> None:
    envoy, replicas = replica_pair.envoy, replica_pair.replicas
    counting = {"content": "Count to 300.", "system_prompt": COUNTING_SYSTEM_PROMPT, "temperature": 0}
    users = [new_user() for _ in range(4)]
    async with httpx.AsyncClient(base_url=envoy.base_url, timeout=60.0) as http:
        for user in users:
            for _ in range(5):
                assert (await http.get("/chats", headers=bearer(user))).status_code == 200
        before = await host_stats(envoy)
        assert set(before) == set(replicas)
        assert all(int(host["rq_total"]) > 0 for host in before.values()), before

        victim, survivor = list(replicas)
        replicas[victim].kill()
        replicas[victim].wait()

        async def victim_connections_closed() -> bool:
            return (await host_stats(envoy))[victim]["cx_active"] == "0"

        # Envoy has seen its connections to the victim close, so no call goes out on one of them.
        await eventually(victim_connections_closed, "Envoy still holds connections to the killed replica")
        # Before the health check has caught up, calls that hit the dead replica are retried elsewhere
        # (connection refused is safe to retry, even for a completion).
        for user in users:
            assert (await http.get("/chats", headers=bearer(user))).status_code == 200
        check_completion_shape(await post_stream(http, "/chat", users[0], {**counting, "max_tokens": 4}))

        async def victim_marked_unhealthy() -> bool:
            return "failed_active_hc" in (await host_stats(envoy))[victim]["health_flags"]

        await eventually(victim_marked_unhealthy, "the health check never marked the killed replica")
        served_before = int((await host_stats(envoy))[survivor]["rq_total"])
        for user in users[1:]:
            check_completion_shape(await post_stream(http, "/chat", user, {**counting, "max_tokens": 4}))
            assert (await http.get("/chats", headers=bearer(user))).status_code == 200
        assert int((await host_stats(envoy))[survivor]["rq_total"]) >= served_before + 6


async def test_a_replica_with_a_full_engine_hands_the_completion_to_another(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Backpressure through the gateway: a replica whose engine is full refuses a completion before any
    byte of the answer (RESOURCE_EXHAUSTED), Envoy retries it on the other replica, and there it is
    answered and stored once. With every replica full, the client gets a 429 with a retry hint."""
    url = mesh.database_url
    with (
        inference_service(max_concurrent=1, max_queue=0, run_dir=tmp_path / "engine") as engine,
        chat_service(url, engine.address, migrate=False) as busy_replica,
        chat_service(url, mesh.inference, migrate=False) as free_replica,
    ):
        busy_engine, busy, free = engine.address, busy_replica.address, free_replica.address
        async with grpc.aio.insecure_channel(busy_engine) as engine_channel:
            holding = inference_pb2_grpc.InferenceServiceStub(engine_channel).Generate(
                ipb.GenerateRequest(messages=LONG, sampling=ipb.SamplingParams(max_tokens=600, temperature=0))
            )
            await holding.read()  # the busy engine's only slot is taken
            user = new_user()
            body = {"content": "Hi", "max_tokens": 4, "temperature": 0}
            async with (
                run_envoy(gateway_settings([busy, free]), tmp_path / "both") as envoy,
                httpx.AsyncClient(base_url=envoy.base_url, timeout=60.0) as http,
            ):
                # The balancer picks replicas at random among the least loaded: ask until one of the
                # requests has met the busy replica and been retried.
                chats: list[str] = []
                retries = 0
                while retries == 0 and len(chats) < 40:
                    stream = await post_stream(http, "/chat", user, body)
                    check_completion_shape(stream)
                    chats.append(stream.first["chat_id"])
                    stats = await envoy.stats(r"^cluster\.chat\.upstream_rq_retry$")
                    retries = stats.get("cluster.chat.upstream_rq_retry", 0)
                assert retries >= 1, f"none of {len(chats)} completions met the busy replica"
                for chat_id in chats:
                    messages = (await http.get(f"/chat/{chat_id}/messages", headers=bearer(user))).json()
                    roles = [m["role"] for m in messages["messages"]]
                    assert roles == ["ROLE_USER", "ROLE_ASSISTANT"], "every question is stored once"
                listed = (await http.get("/chats", headers=bearer(user), params={"page_size": 100})).json()
                assert len(listed["chats"]) == len(chats), "a retried request creates one chat"
            async with (
                run_envoy(gateway_settings([busy]), tmp_path / "busy-only") as envoy,
                httpx.AsyncClient(base_url=envoy.base_url, timeout=60.0) as http,
            ):
                refused = await http.post("/chat", json=body, headers=bearer(user))
                assert refused.status_code == 429, refused.text
                assert refused.json()["code"] == "RESOURCE_EXHAUSTED", refused.json()
                assert int(refused.headers["retry-after-ms"]) > 0, refused.headers
            holding.cancel()


async def test_the_semantic_cache_over_rest(
    mesh: Mesh, embedding_service: tuple[str, LoggedProcess], tmp_path: Path
) -> None:
    """Through Envoy: a repeated question is answered from the cache (`cached: true` in the final event),
    `skip_cache` in the body makes the model answer, and `DELETE /cache` clears the caller's entries."""
    collection = f"rest_{uuid.uuid4().hex[:12]}"
    content = "What is the capital of France?"
    question = {"content": content, "max_tokens": 48, "temperature": 0}
    with chat_service(
        mesh.database_url,
        mesh.inference,
        migrate=False,
        cache_address=embedding_service[0],
        cache_collection=collection,
        cache_lookup_timeout_s=10,  # a busy test machine must not turn hits into misses
    ) as cached:
        replica = cached.address
        async with (
            run_envoy(gateway_settings([replica]), tmp_path / "envoy") as envoy,
            httpx.AsyncClient(base_url=envoy.base_url, timeout=60.0) as http,
        ):
            user = new_user()
            first = await post_stream(http, "/chat", user, question)
            check_completion_shape(first)
            assert first.last["finish_reason"] == "FINISH_REASON_STOP" and not first.last.get("cached")

            async def answer_stored() -> bool:
                return await cache_entries(embedding_service[0], collection, {"owner": user}) == 1

            # The answer is stored just after it was sent.
            await eventually(answer_stored, "the answer never reached the cache")
            again = await post_stream(http, "/chat", user, question)
            assert again.status == 200 and again.last.get("cached") is True, again.last
            assert "".join(e.data["delta"] for e in again.deltas) == "".join(
                e.data["delta"] for e in first.deltas
            )
            assert again.last["finish_reason"] == "FINISH_REASON_STOP" and again.last["assistant_message_id"]
            skipped = await post_stream(http, "/chat", user, {**question, "skip_cache": True})
            check_completion_shape(skipped)
            assert not skipped.last.get("cached"), "skip_cache: the model answered"

            cleared = await http.delete("/cache", headers=bearer(user))
            assert cleared.status_code == 200, cleared.text
            assert int(cleared.json()["deleted_entries"]) == 1, cleared.json()
            after = await post_stream(http, "/chat", user, question)
            check_completion_shape(after)
            assert not after.last.get("cached"), "a cleared cache misses"
            assert (await http.delete("/cache")).status_code == 401, "only with a token"


@dataclass
class Rs256Stack:
    """A chat replica and Envoy that verify RS256 tokens of one key pair (on the module's engine)."""

    envoy: EnvoyProcess
    keys: JwtKeys


@pytest.fixture
async def rs256_stack(mesh: Mesh, tmp_path: Path) -> AsyncIterator[Rs256Stack]:
    files = write_rs256_key_pair(tmp_path / "jwt.key", tmp_path / "jwt.pub")
    with chat_service(
        f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        mesh.inference,
        jwt_public_key_file=files.public_key,  # wins over the HS256 secret
    ) as replica:
        settings = gateway_settings([replica.address], jwt_secret=None, jwt_public_key_file=files.public_key)
        async with run_envoy(settings, tmp_path / "envoy") as envoy:
            keys = JwtKeys.rs256(files.public_key.read_text(), files.private_key.read_text())
            yield Rs256Stack(envoy, keys)


async def test_rs256_tokens_are_checked_at_the_edge_and_by_the_service(rs256_stack: Rs256Stack) -> None:
    envoy = rs256_stack.envoy
    user = new_user()
    good = {"authorization": f"Bearer {issue_token(rs256_stack.keys, user)}"}
    async with httpx.AsyncClient(base_url=envoy.base_url, timeout=60.0) as http:
        body = {"content": "Count to 300.", "system_prompt": COUNTING_SYSTEM_PROMPT, "max_tokens": 4}
        async with http.stream("POST", "/chat", json=body, headers=good) as response:
            assert response.status_code == 200, await response.aread()
            events = [event async for event in sse_events(response)]
        assert events[0].data["chat_id"] and "finish_reason" in events[-1].data, events
        listed = (await http.get("/chats", headers=good)).json()["chats"]
        assert [c["chat_id"] for c in listed] == [events[0].data["chat_id"]]

        denied_before = (await envoy.stats(r"jwt_authn\.denied$")).get("http.public.jwt_authn.denied", 0)
        upstream_before = await upstream_requests(envoy)
        other_pair = write_rs256_key_pair(
            envoy.config_path.parent / "other.key", envoy.config_path.parent / "o.pub"
        )
        stranger = JwtKeys.rs256(other_pair.public_key.read_text(), other_pair.private_key.read_text())
        for token in (issue_token(stranger, user), token_for(user)):  # another RS256 key; HS256
            reply = await http.get("/chats", headers={"authorization": f"Bearer {token}"})
            assert reply.status_code == 401, reply.text
            assert reply.json()["code"] == "UNAUTHENTICATED"
        denied = (await envoy.stats(r"jwt_authn\.denied$"))["http.public.jwt_authn.denied"]
        assert denied - denied_before == 2
        assert await upstream_requests(envoy) == upstream_before, "a rejected call reached the replica"


def test_rendered_config_passes_envoy_validate(tmp_path: Path) -> None:
    path = tmp_path / "envoy.json"
    path.write_text(render_envoy_config(gateway_settings(["127.0.0.1:50051", "chat-2.internal:50051"])))
    assert "OK" in validate_config(path)
    capped = gateway_settings(["127.0.0.1:50051"], max_active_completions=16)
    path.write_text(render_envoy_config(capped))
    assert "OK" in validate_config(path)
    # The check has teeth: Envoy rejects a config with a typo in a field name.
    path.write_text(re.sub(r'"stream_idle_timeout"', '"stream_idle_timout"', path.read_text()))
    with pytest.raises(ValueError, match="stream_idle_timout"):
        validate_config(path)


def test_the_committed_envoy_yaml_with_its_placeholders_filled_in_passes_envoy_validate(
    tmp_path: Path,
) -> None:
    # envoy/envoy.yaml, the default settings' config for Envoy users to read (drift-checked by the unit
    # tests and `make lint`), is a config Envoy takes once the per-machine values are put in.
    text = (Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml").read_text()
    secret = base64.urlsafe_b64encode(TEST_SECRET.encode()).rstrip(b"=").decode()
    package = default_descriptor_path().parent.parent
    path = tmp_path / "envoy.yaml"
    for placeholder, value in (
        ("<gateway>", str(package)),
        ("<JWT secret, base64url>", secret),
        ("<API-key secret, base64url>", secret),  # any 32+ characters: Envoy only validates
    ):
        text = text.replace(placeholder, value)
    path.write_text(text)
    assert "<gateway>" not in text and "secret, base64url>" not in text
    assert "OK" in validate_config(path)


def test_a_non_editable_install_runs_the_gateway_on_its_packaged_descriptor_set(tmp_path: Path) -> None:
    # Build from a copy of the project (an in-tree build would leave build/ and egg-info behind) and
    # install into a plain directory, never into the shared environment.
    source, target, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "cwd"
    root = Path(__file__).resolve().parents[2]
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("chatmesh", "envoy", "chat_service", "inference_service", "embedding_service"):
        shutil.copytree(root / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--no-index", "--target", str(target), str(source)],
        check=True,
        timeout=300,
    )
    env = {
        **os.environ,
        # Only the installed copy, not this source tree (cwd is elsewhere too).
        "PYTHONPATH": str(target),
        "CHATMESH_GATEWAY_JWT_SECRET": TEST_SECRET,
        "CHATMESH_GATEWAY_CHAT_ADDRESSES": "127.0.0.1:50051",
    }

    def gateway(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout

    packaged = target / "gateway" / "data" / "chatmesh.pb"
    assert packaged.is_file(), "the descriptor set is package data"
    assert str(packaged) in gateway("--print"), "the installed gateway transcodes with its own copy"
    assert "OK" in gateway("--validate", "--workdir", str(tmp_path / "work"))


async def test_a_user_beyond_their_concurrent_completions_gets_429_with_a_retry_hint(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    """The per-user limit (the default: 2 completions at once, counted in the database across replicas)
    through the gateway: a user holding 2 gets a 429 naming the limit and its setting, with a retry hint,
    while another user is served; once one of the 2 ends, the user is served again."""
    user = new_user()
    # Greedy, with a known answer: a sampled reply to "Hi" can be 4 tokens of nothing but whitespace.
    body = {"content": "What is the capital of France?", "max_tokens": 4, "temperature": 0}
    # The user's 2 completions, running on some replica: their leased rows in the shared database (real
    # streams would end on their own before a loaded machine got to the third request).
    async with open_sql_store(mesh.database_url, migrate=False) as store:
        held = [uuid.uuid4(), uuid.uuid4()]
        for slot in held:
            assert await store.take_generation_slot(user, slot, Lease("replica-elsewhere", 600), 2)
        refused = await http.post("/chat", json=body, headers=bearer(user))
        assert refused.status_code == 429, refused.text
        error = refused.json()
        assert error["code"] == "RESOURCE_EXHAUSTED", error
        assert "CHATMESH_CHAT_MAX_CONCURRENT_COMPLETIONS_PER_USER" in error["message"], error
        assert int(refused.headers["retry-after-ms"]) > 0, refused.headers
        check_completion_shape(await post_stream(http, "/chat", new_user(), body))
        await store.release_generation_slot(held[0])
        check_completion_shape(await post_stream(http, "/chat", user, body))


async def test_completions_beyond_the_gateways_cap_are_refused_at_the_edge(
    mesh: Mesh, tmp_path: Path
) -> None:
    """With `max_active_completions`, one completion too many is refused by Envoy itself (429 /
    RESOURCE_EXHAUSTED with a retry hint; no replica sees it) while the admitted one streams on, and
    the short calls are not capped."""
    settings = gateway_settings(list(mesh.replicas), max_active_completions=1, rate_limit_per_s=0)
    user = new_user()
    async with (
        run_envoy(settings, tmp_path) as envoy,
        httpx.AsyncClient(base_url=envoy.base_url, timeout=60.0) as http,
        grpc.aio.insecure_channel(envoy.listen_address) as channel,
    ):
        body = {"system_prompt": COUNTING_SYSTEM_PROMPT, "content": "Count to 300.", "max_tokens": 300}
        async with http.stream("POST", "/chat", json=body, headers=bearer(user)) as admitted:
            assert admitted.status_code == 200
            events = sse_events(admitted)
            while "delta" not in (await anext(events)).data:
                pass
            before = await upstream_requests_of(envoy, "chat_completions")

            refused = await http.post("/chat", json={"content": "Hi", "max_tokens": 4}, headers=bearer(user))
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "RESOURCE_EXHAUSTED"
            assert refused.headers["retry-after-ms"] == "1000"
            client = ChatClient(channel, user)
            with pytest.raises(grpc.aio.AioRpcError) as grpc_refused:
                async for _ in client.stub.CreateChat(
                    pb.CreateChatRequest(content="Hi", max_tokens=4), metadata=client.metadata
                ):
                    pass
            assert grpc_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await upstream_requests_of(envoy, "chat_completions") == before, "no replica saw them"
            listed = await http.get("/chats", headers=bearer(user))
            assert listed.status_code == 200, "short calls are not capped"

            # The admitted completion is still streaming after both refusals.
            assert "delta" in (await anext(events)).data

        # Once it is over (the client left), the next completion is admitted.
        async def admitted_again() -> bool:
            reply = await http.post("/chat", json={"content": "Hi", "max_tokens": 4}, headers=bearer(user))
            assert reply.status_code in (200, 429), reply.text
            return reply.status_code == 200

        await eventually(admitted_again, "a completion admitted after the first one ended")


async def upstream_requests_of(envoy: EnvoyProcess, cluster: str) -> int:
    name = f"cluster.{cluster}.upstream_rq_total"
    stats = await envoy.stats(rf"^{re.escape(name)}$")
    return stats.get(name, 0)
