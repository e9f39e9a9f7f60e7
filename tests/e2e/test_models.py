"""Several models at once through the whole mesh behind the real Envoy: a chat picks its model over REST and
gRPC, switches it, every reply says which model wrote it, and a model that is not served is a 404 naming
the ones that are.

One stack for the module: the session's two-model engine (tests/e2e/conftest.py), one chat replica on a
fresh PostgreSQL database, Envoy in front. Replies are a few tokens: these tests are about routing, not
answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.client import AsyncChatClient
from chatmesh.common.errors import NotFound
from gateway import EnvoyProcess
from tests.e2e.conftest import DEFAULT_MODEL, SECOND_MODEL
from tests.support.chat import bearer, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.stack import chat_stack

pytestmark = pytest.mark.e2e

SHORT = 6
"""max_tokens of every reply here."""


@pytest.fixture(scope="module")
async def envoy(
    tmp_path_factory: pytest.TempPathFactory, two_models_address: str
) -> AsyncIterator[EnvoyProcess]:
    async with (
        fresh_postgres_database() as url,
        chat_stack(two_models_address, url, envoy_dir=tmp_path_factory.mktemp("envoy")) as stack,
    ):
        yield stack.envoy


@pytest.fixture
async def http(envoy: EnvoyProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=envoy.base_url, timeout=60.0) as client:
        yield client


def new_user() -> str:
    return f"models-{uuid.uuid4().hex[:8]}"


async def post_events(
    http: httpx.AsyncClient, path: str, user: str, body: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """POST a completion: (status, its server-sent events' JSON), or (status, [the error body])."""
    async with http.stream("POST", path, json=body, headers=bearer(user)) as response:
        await response.aread()
        if response.status_code != 200:
            return response.status_code, [response.json()]
        blocks = response.text.replace("\r\n", "\n").split("\n\n")
        return 200, [json.loads(block.removeprefix("data:").strip()) for block in blocks if block.strip()]


async def replies_models(http: httpx.AsyncClient, user: str, chat_id: str) -> list[str]:
    """The `model` of each assistant message of the chat, oldest first ("" when absent)."""
    reply = await http.get(f"/chat/{chat_id}/messages", headers=bearer(user))
    assert reply.status_code == 200, reply.text
    return [m.get("model", "") for m in reply.json()["messages"] if m["role"] == "ROLE_ASSISTANT"]


def served_named(message: str) -> bool:
    return DEFAULT_MODEL in message and SECOND_MODEL in message


async def test_rest_lists_the_models_and_a_chat_picks_and_switches_its_model(http: httpx.AsyncClient) -> None:
    user = new_user()
    listed = await http.get("/models", headers=bearer(user))
    assert listed.status_code == 200, listed.text
    models = listed.json()
    assert [m["name"] for m in models["models"]] == [DEFAULT_MODEL, SECOND_MODEL]
    assert models["default_model"] == DEFAULT_MODEL
    assert all(m["context_length"] > 0 and m["default_max_tokens"] > 0 for m in models["models"])

    # A chat on the second model: the chat says so, and so does its reply.
    status, events = await post_events(
        http, "/chat", user, {"content": "Say hello.", "model": SECOND_MODEL, "max_tokens": SHORT}
    )
    assert status == 200, events
    chat = events[0]["chat"]
    assert chat["model"] == SECOND_MODEL
    assert events[-1]["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH"), events[-1]
    assert await replies_models(http, user, chat["chat_id"]) == [SECOND_MODEL]

    # Switched to the default model: the next turn (with the whole history) is the default's.
    patched = await http.patch(
        f"/chat/{chat['chat_id']}", json={"model": DEFAULT_MODEL}, headers=bearer(user)
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["chat"]["model"] == DEFAULT_MODEL
    status, events = await post_events(
        http, f"/chat/{chat['chat_id']}/completion", user, {"content": "Again.", "max_tokens": SHORT}
    )
    assert status == 200, events
    assert await replies_models(http, user, chat["chat_id"]) == [SECOND_MODEL, DEFAULT_MODEL]

    # A chat that names no model gets the default; the list shows each chat's model.
    status, events = await post_events(http, "/chat", user, {"content": "Hi.", "max_tokens": SHORT})
    assert status == 200 and events[0]["chat"]["model"] == DEFAULT_MODEL
    chats = (await http.get("/chats", headers=bearer(user))).json()["chats"]
    assert [c["model"] for c in chats] == [DEFAULT_MODEL, DEFAULT_MODEL]


async def test_a_model_that_is_not_served_is_404_naming_the_served_ones(http: httpx.AsyncClient) -> None:
    user = new_user()
    status, [error] = await post_events(http, "/chat", user, {"content": "Hi.", "model": "gpt-4o"})
    assert status == 404, error
    assert error["code"] == "NOT_FOUND" and served_named(error["message"]), error
    status, events = await post_events(http, "/chat", user, {"title": "empty"})
    assert status == 200
    chat_id = events[0]["chat_id"]
    patched = await http.patch(f"/chat/{chat_id}", json={"model": "gpt-4o"}, headers=bearer(user))
    assert patched.status_code == 404, patched.text
    assert served_named(patched.json()["message"])
    # Nothing changed: the chat keeps the default model.
    chats = (await http.get("/chats", headers=bearer(user))).json()["chats"]
    assert [c["model"] for c in chats] == [DEFAULT_MODEL]


async def test_grpc_through_the_gateway_with_the_sdk(envoy: EnvoyProcess) -> None:
    user = new_user()
    async with grpc.aio.insecure_channel(envoy.listen_address) as channel:
        client = AsyncChatClient(channel, token=lambda: token_for(user))
        listed = await client.list_models()
        assert [m.name for m in listed.models] == [DEFAULT_MODEL, SECOND_MODEL]
        assert listed.default_model == DEFAULT_MODEL
        reply = await client.complete("Name a colour.", model=SECOND_MODEL, max_tokens=SHORT)
        assert reply.chat is not None and reply.chat.model == SECOND_MODEL
        chat = await client.update_chat(reply.chat_id, model=DEFAULT_MODEL)
        assert chat.model == DEFAULT_MODEL
        await client.complete("Another.", chat_id=reply.chat_id, max_tokens=SHORT)
        written = [m.model async for m in client.iter_messages(reply.chat_id) if m.role == pb.ROLE_ASSISTANT]
        assert written == [SECOND_MODEL, DEFAULT_MODEL]
        with pytest.raises(NotFound) as missing:
            await client.create_chat(model="gpt-4o")
        assert served_named(str(missing.value))


def test_the_terminal_client_starts_a_chat_on_the_model_it_is_given(envoy: EnvoyProcess) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatmesh",
            "chat",
            "--address",
            envoy.listen_address,
            "--token",
            token_for(new_user()),
            "--model",
            SECOND_MODEL,
            "-m",
            "Say hi.",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The reply's closing line names the model that wrote it.
    assert f" tokens, {SECOND_MODEL}]" in result.stdout, result.stdout


def test_the_terminal_clients_model_commands(envoy: EnvoyProcess) -> None:
    lines = ["/models", f"/model {SECOND_MODEL}", "Say hi.", f"/model {DEFAULT_MODEL}", "/history", "/quit"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatmesh",
            "chat",
            "--address",
            envoy.listen_address,
            "--token",
            token_for(new_user()),
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The list marks the model new chats get; /model chooses another for the next chat, then switches it.
    assert f"* {DEFAULT_MODEL}" in out and f"  {SECOND_MODEL}" in out, out
    assert f"new chats use {SECOND_MODEL}" in out, out
    assert f" tokens, {SECOND_MODEL}]" in out, out
    assert f"this chat now uses {DEFAULT_MODEL}" in out, out
    assert f"assistant ({SECOND_MODEL}): " in out, out
