"""The whole mesh behind the real Envoy gateway, driven over REST (HTTP/1.1, httpx) and gRPC.

One stack for the module: the inference service, two chat replicas on one fresh PostgreSQL database,
and Envoy in front with a low per-user rate limit and fast health checks. The test that kills a
replica runs last. The mid-stream failure test gets its own small stack (engine, replica, Envoy),
because it kills the engine.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.gateway import EnvoyProcess, GatewaySettings, render_envoy_config, run_envoy, validate_config
from tests.support.chat import TEST_SECRET, ChatClient, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import LoggedProcess, free_port, run_service
from tests.support.services import COUNTING_SYSTEM_PROMPT, chat_env, standard_engine_env

pytestmark = pytest.mark.e2e

RATE_PER_S = 10
BURST = 20


def gateway_settings(replicas: list[str]) -> GatewaySettings:
    return GatewaySettings(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        admin_port=free_port(),
        chat_addresses=replicas,
        jwt_secret=TEST_SECRET,
        rate_limit_per_s=RATE_PER_S,
        rate_limit_burst=BURST,
        # Fast, so that a killed replica is noticed within the test's patience.
        health_check_interval_s=0.5,
        health_check_timeout_s=0.5,
        concurrency=2,
    )


@dataclass
class Mesh:
    """The running module stack."""

    envoy: EnvoyProcess
    replicas: dict[str, LoggedProcess]


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, inference_address: str) -> AsyncIterator[Mesh]:
    inference = inference_address  # the session's engine (tests/conftest.py)
    first, second = (f"127.0.0.1:{free_port()}" for _ in range(2))
    async with fresh_postgres_database() as url:
        with (
            # The first replica migrates the fresh database; the second starts on the migrated schema.
            run_service("chat_service", chat_env(first, url, inference), first, timeout=60) as one,
            run_service(
                "chat_service", chat_env(second, url, inference, migrate=False), second, timeout=60
            ) as two,
        ):
            settings = gateway_settings([first, second])
            async with run_envoy(settings, tmp_path_factory.mktemp("envoy")) as envoy:
                yield Mesh(envoy, {first: one, second: two})


@pytest.fixture
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.envoy.base_url, timeout=60.0) as client:
        yield client


@pytest.fixture
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.envoy.listen_address) as channel:
        yield channel


def bearer(user: str, secret: str = TEST_SECRET) -> dict[str, str]:
    return {"authorization": f"Bearer {token_for(user, secret)}"}


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


@dataclass
class Event:
    """One server-sent event and when it arrived (monotonic seconds)."""

    data: dict[str, Any]
    at: float


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
    """Parse `data: {json}` events off the wire as they arrive."""
    data_lines: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data_lines.append(line[5:].strip())
        elif not line and data_lines:
            yield Event(json.loads("\n".join(data_lines)), time.monotonic())
            data_lines = []
    if data_lines:
        yield Event(json.loads("\n".join(data_lines)), time.monotonic())


async def post_stream(client: httpx.AsyncClient, path: str, user: str, body: dict[str, Any]) -> Stream:
    async with client.stream("POST", path, json=body, headers=bearer(user)) as response:
        stream = Stream(response.status_code, response.headers.get("content-type", ""))
        if response.status_code != 200:
            await response.aread()
            stream.events.append(Event(response.json(), time.monotonic()))
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
    assert gone.status_code == 404 and gone.json()["code"] == 5
    assert (await http.get("/chats", headers=bearer(ada))).json().get("chats", []) == []


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
    later_deltas = [e for e in rest if "delta" in e.data]
    assert len(later_deltas) >= 20
    assert final.at - first_delta.at > 0.1, "the reply arrived in one piece, not as it was generated"
    gaps = [b.at - a.at for a, b in zip([first_delta, *later_deltas], later_deltas, strict=False)]
    assert sum(gap > 0.002 for gap in gaps) >= 10, "deltas arrive spread out, token by token"
    stored = (await http.get(f"/chat/{chat_id}/messages", headers=bearer(user))).json()["messages"]
    assert stored[-1]["content"] == "".join(e.data["delta"] for e in [first_delta, *later_deltas])


@pytest.fixture
async def doomed_stack(tmp_path: Path) -> AsyncIterator[tuple[EnvoyProcess, LoggedProcess]]:
    """Envoy -> one replica (SQLite) -> an inference service the test may kill. Yields (envoy, engine)."""
    inference = f"127.0.0.1:{free_port()}"
    replica = f"127.0.0.1:{free_port()}"
    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    with (
        run_service("inference_service", standard_engine_env(inference), inference, timeout=60) as engine,
        run_service("chat_service", chat_env(replica, url, inference), replica, timeout=60),
    ):
        async with run_envoy(gateway_settings([replica]), tmp_path / "envoy") as envoy:
            yield envoy, engine


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
    assert missing.json() == {"code": 16, "message": "Jwt is missing"}
    assert missing.headers["www-authenticate"].startswith("Bearer")
    forged = bearer("alice", secret="not-the-server-secret-" + "y" * 30)
    for reply in (
        await http.get("/chats", headers=forged),
        await http.post("/chat", json={"content": "hi"}, headers=forged),
        await http.get("/chats", headers={"authorization": "Basic YWxpY2U6c2VjcmV0"}),
    ):
        assert reply.status_code == 401, reply.text
        assert reply.json()["code"] == 16
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListChats(pb.ListChatsRequest(), metadata=tuple(forged.items()))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    denied = (await mesh.envoy.stats(r"jwt_authn\.denied$"))["http.public.jwt_authn.denied"]
    assert denied - denied_before == 5
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
        assert reply.json()["code"] == 5 and "secret" not in reply.json()["message"]
    stolen = await post_stream(http, f"/chat/{chat_id}/completion", bob, {"content": "hi"})
    assert stolen.status == 404 and stolen.first["code"] == 5
    assert (await http.get("/chats", headers=bearer(alice))).json()["chats"][0]["title"] == "secret plans"


async def test_bad_input_is_400_with_a_message_naming_the_field(http: httpx.AsyncClient) -> None:
    user = new_user()
    chat_id = (await post_stream(http, "/chat", user, {"title": "target"})).first["chat_id"]
    empty = await post_stream(http, f"/chat/{chat_id}/completion", user, {"content": ""})
    assert empty.status == 400 and empty.content_type == "application/json"
    assert empty.first["code"] == 3 and empty.first["message"].startswith("content"), empty.first
    big_page = await http.get("/chats", params={"page_size": "1000"}, headers=bearer(user))
    assert big_page.status_code == 400 and big_page.json()["message"].startswith("page_size")
    hot = await post_stream(http, f"/chat/{chat_id}/completion", user, {"content": "hi", "temperature": 5})
    assert hot.status == 400 and hot.first["message"].startswith("temperature")
    # Rejected by the transcoder, before any replica: unparseable JSON and unknown query parameters.
    broken = await http.post("/chat", content=b'{"content":', headers=bearer(user))
    assert broken.status_code == 400 and broken.json()["code"] == 3
    unknown = await http.get("/chats", params={"colour": "red"}, headers=bearer(user))
    assert unknown.status_code == 400 and "colour" in unknown.json()["message"]


async def test_unknown_paths_are_404_and_wrong_methods_405(
    http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    auth = bearer(new_user())
    for path in ("/", "/nope", "/chats/extra/parts", "/chat/x/y/z"):
        reply = await http.get(path, headers=auth)
        assert reply.status_code == 404, path
        assert reply.json()["code"] == 5
    for method, path, allowed in (
        ("PUT", "/chats", "GET"),
        ("GET", "/chat", "POST"),
        ("GET", f"/chat/{uuid.uuid4()}/completion", "POST"),
        ("POST", f"/chat/{uuid.uuid4()}/messages", "GET"),
        ("POST", f"/chat/{uuid.uuid4()}", "PATCH, DELETE"),
    ):
        reply = await http.request(method, path, headers=auth)
        assert reply.status_code == 405, (method, path, reply.text)
        assert reply.headers["allow"] == allowed and reply.json()["code"] == 12
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

    async def grpc_status() -> grpc.StatusCode:
        try:
            await stub.ListChats(pb.ListChatsRequest(), metadata=tuple(bearer(greedy).items()))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    # REST and gRPC calls of one user share one bucket: drain it over REST, then call over gRPC.
    started = time.monotonic()
    replies = await asyncio.gather(*(http.get("/chats", headers=bearer(greedy)) for _ in range(3 * BURST)))
    codes = await asyncio.gather(*(grpc_status() for _ in range(BURST)))
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 429}, statuses
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    # The bucket starts with BURST tokens and gets RATE_PER_S more each second.
    passed = statuses.count(200) + codes.count(grpc.StatusCode.OK)
    assert BURST <= passed <= BURST + RATE_PER_S * (int(elapsed) + 1), (statuses, codes, elapsed)
    limited = next(r for r in replies if r.status_code == 429)
    assert limited.json() == {"code": 8, "message": "local_rate_limited"}
    assert limited.headers["x-ratelimit-limit"] == str(BURST)
    assert (await http.get("/chats", headers=bearer(other))).status_code == 200, "others are unaffected"


async def test_zz_both_replicas_serve_and_losing_one_is_survivable(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    # Runs last in the module: it kills a replica.
    users = [new_user() for _ in range(4)]
    for user in users:
        for _ in range(5):
            assert (await http.get("/chats", headers=bearer(user))).status_code == 200
    before = await host_stats(mesh.envoy)
    assert set(before) == set(mesh.replicas)
    assert all(int(host["rq_total"]) > 0 for host in before.values()), before

    victim, survivor = list(mesh.replicas)
    mesh.replicas[victim].kill()
    await asyncio.sleep(0.2)  # let Envoy see its connections to the victim close

    # Before the health check has caught up, calls that hit the dead replica are retried elsewhere
    # (connection refused is safe to retry, even for a completion).
    for user in users:
        assert (await http.get("/chats", headers=bearer(user))).status_code == 200
    streamed = await post_stream(http, "/chat", users[0], {"content": "Hello!", "max_tokens": 4})
    check_completion_shape(streamed)

    deadline = time.monotonic() + 10
    while "failed_active_hc" not in (await host_stats(mesh.envoy))[victim]["health_flags"]:
        assert time.monotonic() < deadline, "the health check never marked the killed replica"
        await asyncio.sleep(0.1)
    served_before = int((await host_stats(mesh.envoy))[survivor]["rq_total"])
    for user in users[1:]:
        check_completion_shape(await post_stream(http, "/chat", user, {"content": "Hi", "max_tokens": 4}))
        assert (await http.get("/chats", headers=bearer(user))).status_code == 200
    assert int((await host_stats(mesh.envoy))[survivor]["rq_total"]) >= served_before + 6


def test_rendered_config_passes_envoy_validate(tmp_path: Path) -> None:
    path = tmp_path / "envoy.json"
    path.write_text(render_envoy_config(gateway_settings(["127.0.0.1:50051", "chat-2.internal:50051"])))
    assert "OK" in validate_config(path)
    # The check has teeth: Envoy rejects a config with a typo in a field name.
    path.write_text(re.sub(r'"stream_idle_timeout"', '"stream_idle_timout"', path.read_text()))
    with pytest.raises(ValueError, match="stream_idle_timout"):
        validate_config(path)


def test_settings_read_replicas_from_a_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMESH_GATEWAY_CHAT_ADDRESSES", "10.0.0.1:50051, 10.0.0.2:50051")
    monkeypatch.setenv("CHATMESH_GATEWAY_JWT_SECRET", "s" * 40)
    assert GatewaySettings().chat_addresses == ["10.0.0.1:50051", "10.0.0.2:50051"]
    monkeypatch.setenv("CHATMESH_GATEWAY_CHAT_ADDRESSES", "no-port")
    with pytest.raises(ValueError, match="host:port"):
        GatewaySettings()
