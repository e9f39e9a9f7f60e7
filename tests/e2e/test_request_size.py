"""Request size limits through the real Envoy, for every protocol: REST, the OpenAI API and native gRPC.

The gateway's `max_request_bytes` (default 1 MiB) bounds the body as the client sent it: one byte more
is refused at the edge (413 with a JSON error over HTTP, RESOURCE_EXHAUSTED over gRPC) before any
replica reads it; a body under it reaches the service, which judges it by its own rules. The OpenAI
API reads its body (a Struct) into a request only after checking its size, so a body the edge lets
through but that grows as a Struct (arrays of tiny values) is refused before it is converted.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from gateway import EnvoyProcess
from tests.e2e.test_gateway import post_stream, upstream_requests
from tests.support.chat import auth, bearer
from tests.support.databases import fresh_postgres_database
from tests.support.stack import chat_stack

pytestmark = pytest.mark.e2e

LIMIT = 1024 * 1024  # the gateway's default
OVER = LIMIT + 1024
UNDER = LIMIT - 64 * 1024
REPLICA_LIMIT = 256 * 1024  # the replica's OpenAI body limit, below the gateway's for one test


@dataclass
class Stack:
    envoy: EnvoyProcess
    model: str


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, inference_address: str) -> AsyncIterator[Stack]:
    async with (
        fresh_postgres_database() as url,
        chat_stack(
            inference_address,
            url,
            envoy_dir=tmp_path_factory.mktemp("envoy"),
            gateway={"rate_limit_per_s": 0},
            openai_max_body_bytes=REPLICA_LIMIT,
        ) as running,
    ):
        assert running.gateway is not None and running.gateway.max_request_bytes == LIMIT
        async with httpx.AsyncClient(base_url=running.envoy.base_url) as http:
            reply = await http.get("/v1/models", headers=bearer("someone"))
            model = reply.json()["data"][0]["id"]
        yield Stack(running.envoy, model)


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.envoy.base_url, timeout=60.0) as client:
        yield client


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def test_an_oversized_rest_body_is_413_with_a_json_error_and_reaches_no_replica(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    user = new_user()
    before = await upstream_requests(stack.envoy)
    reply = await http.post("/chat", json={"content": "x" * OVER}, headers=bearer(user))
    assert reply.status_code == 413, reply.text
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()
    assert error["code"] == "RESOURCE_EXHAUSTED"
    assert f"at most {LIMIT} bytes" in error["message"]
    assert await upstream_requests(stack.envoy) == before
    chats = await http.get("/chats", headers=bearer(user))
    assert chats.json().get("chats", []) == []


async def test_an_oversized_grpc_request_is_resource_exhausted_at_the_edge(stack: Stack) -> None:
    before = await upstream_requests(stack.envoy)
    async with grpc.aio.insecure_channel(stack.envoy.listen_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.CreateChat(
                pb.CreateChatRequest(content="x" * OVER), metadata=auth(new_user())
            ):
                pass
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert f"at most {LIMIT} bytes" in (refused.value.details() or "")
    assert await upstream_requests(stack.envoy) == before


async def test_an_oversized_openai_body_is_413_with_an_openai_error(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    before = await upstream_requests(stack.envoy)
    body = {"model": stack.model, "messages": [{"role": "user", "content": "x" * OVER}]}
    reply = await http.post("/v1/chat/completions", json=body, headers=bearer(new_user()))
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "resource_exhausted"
    assert f"at most {LIMIT} bytes" in error["message"]
    assert await upstream_requests(stack.envoy) == before


async def test_a_body_under_the_limit_reaches_the_service_on_every_protocol(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    # Just under the limit: past the edge, and the service's own rule (32,000 characters) answers.
    user = new_user()
    rest = await http.post("/chat", json={"content": "x" * UNDER}, headers=bearer(user))
    assert rest.status_code == 400, rest.text
    assert "at most 32000 characters" in rest.json()["message"]
    body = {"model": stack.model, "messages": [{"role": "user", "content": "x" * UNDER}]}
    openai = await http.post("/v1/chat/completions", json=body, headers=bearer(user))
    assert openai.status_code == 400, openai.text
    assert openai.json()["error"]["param"] == "body"  # the replica's own limit, lower here
    async with grpc.aio.insecure_channel(stack.envoy.listen_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.CreateChat(pb.CreateChatRequest(content="x" * UNDER), metadata=auth(user)):
                pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value


async def test_requests_of_ordinary_size_still_work(stack: Stack, http: httpx.AsyncClient) -> None:
    user = new_user()
    # The longest title and system prompt the API takes, in 4-byte characters.
    created = await post_stream(http, "/chat", user, {"title": "🦙" * 200, "system_prompt": "🦙" * 8_000})
    assert created.status == 200, created.first
    assert created.first["chat"]["title"] == "🦙" * 200
    body = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 2,
    }
    reply = await http.post("/v1/chat/completions", json=body, headers=bearer(user))
    assert reply.status_code == 200, reply.text
    assert reply.json()["object"] == "chat.completion"
    async with grpc.aio.insecure_channel(stack.envoy.listen_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        events = [
            event
            async for event in stub.CreateChat(
                pb.CreateChatRequest(content="Hello there", max_tokens=2), metadata=auth(user)
            )
        ]
    assert events[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


async def test_a_body_that_grows_as_a_struct_is_bounded_at_the_edge_too(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    # 200 KB of JSON; as the Struct the service would convert, each 0 takes 11 bytes (1.1 MB): the
    # transcoder bounds the body it makes as well as the one it reads.
    body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "stop": [0] * 100_000}
    reply = await http.post("/v1/chat/completions", json=body, headers=bearer(new_user()))
    assert reply.status_code == 413, reply.text


async def test_a_replica_checks_an_openai_bodys_size_before_converting_it(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    # The replica's own limit, lower here than the gateway's, answers for a body that got past it.
    body = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "hi"}],
        "stop": [None] * (REPLICA_LIMIT // 4),
    }
    reply = await http.post("/v1/chat/completions", json=body, headers=bearer(new_user()))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "body"
    assert f"at most {REPLICA_LIMIT}" in error["message"]
