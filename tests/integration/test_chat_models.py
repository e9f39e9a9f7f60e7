"""A chat has a model, through real components: one inference service serving two models (one engine per
model), the real chat service on SQLite and PostgreSQL, and the session's embedding service as its semantic
cache. Which engine wrote a reply is read off the inference service's per-model metrics (the tokens each
model generated); that a model got the whole history, off the reply's prompt tokens against what that
model's own tokenizer and template count for it (CountTokens on the inference service).

The routing on fakes (summaries, jobs, the window, metrics) is in tests/unit/test_chat_models.py."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from alembic import command as alembic_command
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from chat_service.storage.migrate import alembic_config
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.inference.v1 import inference_pb2 as ipb
from chatmesh.inference.v1 import inference_pb2_grpc
from tests.support.chat import ChatClient, Completion, grpc_errors
from tests.support.databases import fresh_postgres_database
from tests.support.metrics import scrape, value
from tests.support.processes import LoggedProcess
from tests.support.services import cache_entries
from tests.support.stack import Service, chat_service, free_address, inference_service
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

DEFAULT = "gemma-3-270m"
OTHER = "smollm2-135m-instruct"
MODELS = (DEFAULT, OTHER)

QUESTION = "What is the capital of France?"
SHORT = {"max_tokens": 8, "temperature": 0}
"""Short replies: which model wrote them is told by the engines' metrics, not by their text."""


@dataclass(frozen=True)
class Engines:
    """The inference service serving both models (the first the default), and its metrics endpoint."""

    service: Service
    metrics: str

    def generated(self) -> dict[str, float]:
        """The tokens each model has generated so far."""
        samples = scrape(self.metrics)
        return {
            model: value(
                samples, "gen_ai_server_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output"
            )
            for model in MODELS
        }

    async def wrote(self, before: dict[str, float], model: str, reply: Completion) -> None:
        """Wait until the metrics show that `model`'s engine, and no other, generated `reply` since
        `before` (they are recorded as the generation ends, beside the reply's last event)."""
        expected = {
            name: float(finished(reply).usage.completion_tokens if name == model else 0) for name in MODELS
        }
        assert expected[model] > 0

        def moved() -> bool:
            now = self.generated()
            return {name: now[name] - before[name] for name in MODELS} == expected

        await eventually(moved, f"{model}'s engine alone never generated the reply ({expected})")


@pytest.fixture(scope="module")
def two_models() -> Iterator[Engines]:
    metrics = free_address()
    with inference_service(models=",".join(MODELS), metrics_address=metrics) as service:
        yield Engines(service, metrics)


@contextlib.asynccontextmanager
async def database(backend: str, directory: Path) -> AsyncIterator[str]:
    """A fresh database of `backend` ("sqlite" in `directory`, or "postgresql")."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / f'chat-{uuid.uuid4().hex[:8]}.db'}"
        return
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def chat(
    request: pytest.FixtureRequest,
    two_models: Engines,
    embedding_service: tuple[str, LoggedProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Service, str]]:
    """(the chat service, its cache collection): on each database, with the semantic cache on."""
    collection = f"models_{uuid.uuid4().hex[:12]}"
    async with database(request.param, tmp_path_factory.mktemp("chat")) as url:
        with chat_service(
            url,
            two_models.service.address,
            cache_address=embedding_service[0],
            cache_collection=collection,
            cache_lookup_timeout_s=10,  # a lookup on a busy test machine must not turn a hit into a miss
        ) as service:
            yield service, collection
        assert service.process.returncode == 0


@pytest.fixture
async def channel(chat: tuple[Service, str]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(chat[0].address) as channel:
        yield channel


@pytest.fixture
async def counter(two_models: Engines) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    """The inference service's own API, to count prompts as each model does."""
    async with grpc.aio.insecure_channel(two_models.service.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def counted(counter: inference_pb2_grpc.InferenceServiceStub, model: str, turns: Sequence[str]) -> int:
    """The prompt tokens of `turns` (user, assistant, user, ...) as `model` renders and counts them."""
    roles = [ipb.ROLE_USER, ipb.ROLE_ASSISTANT]
    messages = [ipb.Message(role=roles[i % 2], content=content) for i, content in enumerate(turns)]
    reply = await counter.CountTokens(ipb.CountTokensRequest(messages=messages, model=model))
    return int(reply.prompt_tokens)


async def usage_of(
    client: ChatClient, counter: inference_pb2_grpc.InferenceServiceStub, model: str, turns: Sequence[str]
) -> int:
    """The prompt tokens a reply of `model` to `turns` reports: their count, less what the model's
    template adds to every prompt unasked and usage leaves out (a default system prompt), measured on a
    one-turn chat of the model's."""
    probe = f"Say yes. ({uuid.uuid4().hex[:6]})"
    reply = await client.create(probe, model=model, **SHORT)
    unasked = await counted(counter, model, [probe]) - finished(reply).usage.prompt_tokens
    return await counted(counter, model, turns) - unasked


def finished(completion: Completion) -> pb.CompletionEvent:
    assert completion.last is not None and completion.last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return completion.last


async def reply_model(client: ChatClient, chat_id: str) -> str:
    """The model the chat's last message (a reply) records."""
    history = await client.all_messages(chat_id)
    assert history[-1].role == pb.ROLE_ASSISTANT
    return str(history[-1].model)


async def test_the_models_are_listed_the_default_first(channel: grpc.aio.Channel) -> None:
    listed = await ChatClient(channel).sdk.list_models()
    assert [m.name for m in listed.models] == list(MODELS)
    assert listed.default_model == DEFAULT
    assert all(m.context_length > 0 and m.default_max_tokens > 0 for m in listed.models)


async def test_a_chat_on_each_model_is_answered_by_that_models_engine(
    channel: grpc.aio.Channel, two_models: Engines
) -> None:
    question = f"Name a colour. ({uuid.uuid4().hex[:6]})"  # unique: never a cache hit
    alice = ChatClient(channel)
    for model in (*MODELS, ""):
        before = two_models.generated()
        reply = await alice.create(question, model=model, **SHORT)
        answered_by = model or DEFAULT  # a chat that names no model is the default's, by name
        assert reply.first.chat.model == answered_by
        assert not finished(reply).cached
        await two_models.wrote(before, answered_by, reply)
        assert await reply_model(alice, reply.chat_id) == answered_by


async def test_an_unknown_model_is_not_found_naming_the_served_ones(channel: grpc.aio.Channel) -> None:
    alice = ChatClient(channel)

    async def refused(call: Awaitable[object]) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "gpt-5" in (raised.value.details() or "")
        assert all(model in (raised.value.details() or "") for model in MODELS)

    await refused(alice.create("Hi", model="gpt-5", **SHORT))
    await refused(alice.create(model="gpt-5"))
    assert list((await alice.list()).chats) == [], "nothing was stored"

    chat_id = (await alice.create(model=OTHER)).chat_id
    with pytest.raises(grpc.aio.AioRpcError) as raised, grpc_errors():
        await alice.sdk.update_chat(chat_id, model="gpt-5")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and OTHER in (raised.value.details() or "")
    assert [c.model for c in (await alice.list()).chats] == [OTHER], "the chat kept its model"


async def test_a_chat_switched_to_another_model_sends_it_the_whole_history(
    channel: grpc.aio.Channel, two_models: Engines, counter: inference_pb2_grpc.InferenceServiceStub
) -> None:
    alice = ChatClient(channel)
    first_question = f"My name is Ada. ({uuid.uuid4().hex[:6]})"
    before = two_models.generated()
    first = await alice.create(first_question, model=DEFAULT, **SHORT)
    await two_models.wrote(before, DEFAULT, first)

    updated = await alice.sdk.update_chat(first.chat_id, model=OTHER)
    assert updated.model == OTHER
    whole = [first_question, first.text, "What is my name?"]
    expected_prompt = await usage_of(alice, counter, OTHER, whole)
    before = two_models.generated()
    second = await alice.complete(first.chat_id, "What is my name?", **SHORT)
    await two_models.wrote(before, OTHER, second)
    assert finished(second).usage.prompt_tokens == expected_prompt, "the whole history went to the new model"
    history = await alice.all_messages(first.chat_id)
    assert [(m.role, m.model) for m in history] == [
        (pb.ROLE_USER, ""),
        (pb.ROLE_ASSISTANT, DEFAULT),
        (pb.ROLE_USER, ""),
        (pb.ROLE_ASSISTANT, OTHER),
    ]


async def test_the_cache_never_serves_one_models_answer_for_another(
    channel: grpc.aio.Channel,
    chat: tuple[Service, str],
    two_models: Engines,
    embedding_service: tuple[str, LoggedProcess],
) -> None:
    vectors, collection = embedding_service[0], chat[1]
    alice = ChatClient(channel)

    async def stored(model: str) -> None:
        async def there() -> bool:
            return await cache_entries(vectors, collection, {"owner": alice.user, "model": model}) == 1

        await eventually(there, f"{model}'s answer was never cached")

    # The default model's answer to it ends by itself (only finished answers are cached) well within this.
    ask = {"max_tokens": 48, "temperature": 0}
    before = two_models.generated()
    kept = await alice.create(QUESTION, model=DEFAULT, **ask)
    assert finished(kept).finish_reason == pb.FINISH_REASON_STOP, kept.text
    await two_models.wrote(before, DEFAULT, kept)
    await stored(DEFAULT)

    # The same question to the other model: its own engine answers, not the cached entry.
    before = two_models.generated()
    other_model = await alice.create(QUESTION, model=OTHER, **ask)
    assert not finished(other_model).cached
    await two_models.wrote(before, OTHER, other_model)
    assert await reply_model(alice, other_model.chat_id) == OTHER

    # Asked of the default model again, the answer is its own, from the cache, and says so.
    before = two_models.generated()
    again = await alice.create(QUESTION, model=DEFAULT, **ask)
    assert finished(again).cached and again.text == kept.text
    assert await reply_model(alice, again.chat_id) == DEFAULT
    assert two_models.generated() == before, "no engine generated it"


# -- the migration -----------------------------------------------------------------------------------------


async def database_at_0006_with_a_chat(url: str, backend: str) -> uuid.UUID:
    """Create the schema of revision 0006 (before chats had models) holding one answered chat of
    "old-user"; its id."""
    engine = create_async_engine(url)
    chat_id = uuid.uuid4()
    now = datetime.now(UTC)

    def key(value: uuid.UUID) -> object:
        return value if backend == "postgresql" else value.hex

    def upgrade_to_0006(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        alembic_command.upgrade(config, "0006")

    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade_to_0006)
            await connection.execute(
                text(
                    "INSERT INTO chats (id, user_id, title, system_prompt, history_strategy, created_at,"
                    " last_activity_at) VALUES (:id, 'old-user', 'old chat', '', 'full', :now, :now)"
                ),
                {"id": key(chat_id), "now": now},
            )
            question_id = uuid.uuid4()
            for message_id, role, reply_to in [
                (question_id, "user", None),
                (uuid.uuid4(), "assistant", question_id),
            ]:
                await connection.execute(
                    text(
                        "INSERT INTO messages (id, chat_id, user_id, role, content, token_count,"
                        " finish_reason, reply_to, created_at)"
                        " VALUES (:id, :chat, 'old-user', :role, :content, 3, :finish, :reply_to, :now)"
                    ),
                    {
                        "id": key(message_id),
                        "chat": key(chat_id),
                        "role": role,
                        "content": "Hello." if role == "user" else "Hi there.",
                        "finish": "stop" if role == "assistant" else None,
                        "reply_to": key(reply_to) if reply_to is not None else None,
                        "now": now,
                    },
                )
    finally:
        await engine.dispose()
    return chat_id


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_chats_made_before_chats_had_models_are_the_defaults_after_the_upgrade(
    backend: str, two_models: Engines, counter: inference_pb2_grpc.InferenceServiceStub, tmp_path: Path
) -> None:
    async with database(backend, tmp_path) as url:
        chat_id = await database_at_0006_with_a_chat(url, backend)
        with chat_service(url, two_models.service.address) as service:
            async with grpc.aio.insecure_channel(service.address) as channel:
                old = ChatClient(channel, user="old-user")
                (listed,) = (await old.list()).chats
                assert (listed.chat_id, listed.title, listed.model) == (str(chat_id), "old chat", DEFAULT)
                whole = ["Hello.", "Hi there.", "And you?"]
                expected_prompt = await usage_of(ChatClient(channel), counter, DEFAULT, whole)
                before = two_models.generated()
                reply = await old.complete(str(chat_id), "And you?", **SHORT)
                await two_models.wrote(before, DEFAULT, reply)
                assert finished(reply).usage.prompt_tokens == expected_prompt
                history = await old.all_messages(str(chat_id))
                assert [(m.content, m.model) for m in history[:2]] == [("Hello.", ""), ("Hi there.", "")]
                assert history[-1].model == DEFAULT
