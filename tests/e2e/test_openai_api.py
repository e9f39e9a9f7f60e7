"""The OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`) through the real Envoy gateway, driven
by the real `openai` Python SDK and by `curl -N`.

One stack for the module: the session's two-model engine (tests/e2e/conftest.py) and embedding service,
one chat replica with the semantic cache on (its own collection) on a fresh PostgreSQL database, and Envoy
in front. `model` picks which of the two answers.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from gateway import EnvoyProcess
from tests.e2e.conftest import DEFAULT_MODEL, SECOND_MODEL
from tests.support.chat import bearer, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import LoggedProcess
from tests.support.stack import chat_stack
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"


@dataclass
class Stack:
    envoy: EnvoyProcess
    chat: LoggedProcess
    model: str


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory,
    two_models_address: str,
    embedding_service: tuple[str, LoggedProcess],
) -> AsyncIterator[Stack]:
    async with (
        fresh_postgres_database() as url,
        chat_stack(
            two_models_address,
            url,
            envoy_dir=tmp_path_factory.mktemp("envoy"),
            cache_address=embedding_service[0],
            cache_collection=f"openai_{uuid.uuid4().hex[:8]}",
        ) as running,
    ):
        async with httpx.AsyncClient(base_url=running.envoy.base_url) as http:
            reply = await http.get("/v1/models", headers=bearer("someone"))
            model = reply.json()["data"][0]["id"]
        yield Stack(running.envoy, running.chat.process, model)


def client(stack: Stack, user: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.envoy.base_url}/v1", api_key=token_for(user), max_retries=0)


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def test_models_lists_every_served_model_the_default_first(stack: Stack) -> None:
    async with client(stack, new_user()) as sdk:
        models = [model async for model in sdk.models.list()]
    assert [(m.id, m.object, m.owned_by) for m in models] == [
        (DEFAULT_MODEL, "model", "chatmesh"),
        (SECOND_MODEL, "model", "chatmesh"),
    ]
    assert stack.model == DEFAULT_MODEL
    assert all(m.created > 0 for m in models)


@pytest.mark.parametrize("model", [DEFAULT_MODEL, SECOND_MODEL])
async def test_the_model_named_answers_and_the_reply_says_so(stack: Stack, model: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "Name a colour."}]
    async with client(stack, new_user()) as sdk:
        completion = await sdk.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0
        )
        stream = await sdk.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert completion.model == model
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert chunks and {chunk.model for chunk in chunks} == {model}


async def test_a_completion_without_streaming(stack: Stack) -> None:
    async with client(stack, new_user()) as sdk:
        completion = await sdk.chat.completions.create(
            model=stack.model,
            messages=[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": QUESTION},
            ],
            max_tokens=8,
            temperature=0,
        )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == stack.model
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.completion_tokens >= 1
    assert completion.usage.prompt_tokens > 0
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_a_streamed_completion_arrives_in_chunks_with_usage_last(stack: Stack) -> None:
    async with client(stack, new_user()) as sdk:
        stream = await sdk.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "Count from one to ten."}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 2, "the reply streams in several pieces"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] in (["stop"], ["length"])
    # The usage chunk comes last, with no choices; every other chunk says usage null.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    usage = chunks[-1].usage
    assert usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_curl_sees_raw_server_sent_events_ending_in_done(stack: Stack) -> None:
    body = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "stream": True,
        "max_tokens": 8,
        "temperature": 0,
    }
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "-i",
            f"{stack.envoy.base_url}/v1/chat/completions",
            "-H",
            f"authorization: Bearer {token_for(new_user())}",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    head, _, payload = result.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), head
    assert "content-type: text/event-stream" in head.lower()
    events = [block for block in payload.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # null, not absent: as OpenAI sends them.
    assert chunks[0]["choices"][0]["finish_reason"] is None


async def test_a_repeated_question_is_served_from_the_askers_cache_only(stack: Stack) -> None:
    messages: list[Any] = [{"role": "user", "content": "Which ocean is the largest?"}]
    owner, other = new_user(), new_user()
    async with client(stack, owner) as sdk, client(stack, other) as sdk_other:
        first = await sdk.chat.completions.create(
            model=stack.model, messages=messages, max_tokens=24, temperature=0
        )
        assert first.choices[0].finish_reason == "stop", "only finished answers are cached"
        assert first.usage is not None and first.usage.completion_tokens > 0

        async def served_from_cache() -> bool:
            again = await sdk.chat.completions.create(
                model=stack.model, messages=messages, max_tokens=24, temperature=0
            )
            assert again.choices[0].message.content == first.choices[0].message.content
            assert again.usage is not None
            return again.usage.completion_tokens == 0  # nothing generated

        await eventually(served_from_cache, "the answer is stored in the background")
        # Another user asking the same gets a generated answer.
        theirs = await sdk_other.chat.completions.create(
            model=stack.model, messages=messages, max_tokens=24, temperature=0
        )
        assert theirs.usage is not None and theirs.usage.completion_tokens > 0
        # And the owner asking another model: that model answers, never the first one's cached answer.
        other_model = await sdk.chat.completions.create(
            model=SECOND_MODEL, messages=messages, max_tokens=24, temperature=0
        )
        assert other_model.model == SECOND_MODEL
        assert other_model.usage is not None and other_model.usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"n": 2}, 400, "n", "only 1 choice"),
        ({"stop": ["\n"]}, 400, "stop", "not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
        ({"max_tokens": "many"}, 400, "body", "max_tokens"),
        ({"model": ""}, 400, "model", "required"),
        ({"temperature": 3}, 400, "temperature", "between 0 and 2"),
        ({"messages": []}, 400, "messages", "at least one"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            400,
            "messages[0].role",
            "tools are not supported",
        ),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role", "user's"),
        ({"model": "gpt-4o"}, 404, None, "does not exist"),
    ],
)
async def test_bad_requests_get_openai_error_bodies(
    stack: Stack, body: dict[str, Any], status: int, param: str | None, words: str
) -> None:
    request = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], **body}
    async with httpx.AsyncClient(base_url=stack.envoy.base_url, timeout=60) as http:
        reply = await http.post("/v1/chat/completions", json=request, headers=bearer(new_user()))
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_a_model_that_is_not_served_is_404_naming_the_served_ones(stack: Stack) -> None:
    async with client(stack, new_user()) as sdk:
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
    assert missing.value.status_code == 404
    body = missing.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error", body
    assert DEFAULT_MODEL in body["message"] and SECOND_MODEL in body["message"], body


async def test_the_sdk_raises_its_own_errors(stack: Stack) -> None:
    async with client(stack, new_user()) as sdk:
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.chat.completions.create(
                model=stack.model, messages=[{"role": "user", "content": "hi"}], n=3
            )
        assert bad.value.code == "invalid_argument"
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    anonymous = openai.AsyncOpenAI(base_url=f"{stack.envoy.base_url}/v1", api_key="not-a-jwt", max_retries=0)
    async with anonymous:
        with pytest.raises(openai.AuthenticationError) as denied:
            await anonymous.models.list()
        assert denied.value.status_code == 401
        assert isinstance(denied.value.body, dict) and denied.value.body.get("type") == "authentication_error"
