"""A chat has a model, through real components: one inference service serving two models (one engine per
model), the real chat service on SQLite and PostgreSQL, and the session's embedding service as its semantic
cache. Which engine wrote a reply is proved by its prompt tokens: the reply's usage must equal what that
model's own tokenizer and template count for the prompt (CountTokens on the inference service), and the two
models count the test's prompts differently.

The routing on fakes (summaries, jobs, the window, metrics) is in tests/unit/test_chat_models.py."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
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
from tests.support.processes import LoggedProcess
from tests.support.services import cache_entries
from tests.support.stack import Service, chat_service, inference_service
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

DEFAULT = "gemma-3-270m"
OTHER = "smollm2-135m-instruct"
MODELS = (DEFAULT, OTHER)

QUESTION = "What is the capital of France?"
SHORT = {"max_tokens": 8, "temperature": 0}
"""Short replies: which model wrote them is told by their prompt tokens, not by their text."""


@pytest.fixture(scope="module")
def two_models() -> Iterator[Service]:
    """One inference service serving both models, the first the default."""
    with inference_service(models=",".join(MODELS)) as service:
        yield service


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
    two_models: Service,
    embedding_service: tuple[str, LoggedProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Service, str]]:
    """(the chat service, its cache collection): on each database, with the semantic cache on."""
    collection = f"models_{uuid.uuid4().hex[:12]}"
    async with database(request.param, tmp_path_factory.mktemp("chat")) as url:
        with chat_service(
            url,
            two_models.address,
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
async def engines(two_models: Service) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(two_models.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def prompt_tokens(
    engines: inference_pb2_grpc.InferenceServiceStub, model: str, turns: Sequence[str]
) -> int:
    """The prompt tokens of `turns` (user, assistant, user, ...) as `model` renders and counts them."""
    roles = [ipb.ROLE_USER, ipb.ROLE_ASSISTANT]
    messages = [ipb.Message(role=roles[i % 2], content=content) for i, content in enumerate(turns)]
    counted = await engines.CountTokens(ipb.CountTokensRequest(messages=messages, model=model))
    return int(counted.prompt_tokens)


def finished(completion: Completion) -> pb.CompletionEvent:
    assert completion.last is not None and completion.last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return completion.last


async def reply_model(client: ChatClient, chat_id: str) -> str:
    """The model the chat's last message (a reply) records."""
    history = await client.all_messages(chat_id)
    assert history[-1].role == pb.ROLE_ASSISTANT
    return history[-1].model


async def test_the_models_are_listed_the_default_first(channel: grpc.aio.Channel) -> None:
    listed = await ChatClient(channel).sdk.list_models()
    assert [m.name for m in listed.models] == list(MODELS)
    assert listed.default_model == DEFAULT
    assert all(m.context_length > 0 and m.default_max_tokens > 0 for m in listed.models)


async def test_a_chat_on_each_model_is_answered_by_that_models_engine(
    channel: grpc.aio.Channel, engines: inference_pb2_grpc.InferenceServiceStub
) -> None:
    question = f"Name a colour. ({uuid.uuid4().hex[:6]})"  # unique: never a cache hit
    counts = {model: await prompt_tokens(engines, model, [question]) for model in MODELS}
    assert counts[DEFAULT] != counts[OTHER], "the models' prompts must differ for the proof to hold"
    alice = ChatClient(channel)
    for model in MODELS:
        reply = await alice.create(question, model=model, **SHORT)
        assert reply.first.chat.model == model
        assert not finished(reply).cached
        assert finished(reply).usage.prompt_tokens == counts[model], f"{model}'s engine wrote it"
        assert await reply_model(alice, reply.chat_id) == model
    # A chat that names no model is the default's, by name.
    unnamed = await alice.create(question, **SHORT)
    assert unnamed.first.chat.model == DEFAULT
    assert finished(unnamed).usage.prompt_tokens == counts[DEFAULT]


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
    assert (await alice.list()).chats == [], "nothing was stored"

    chat_id = (await alice.create(model=OTHER)).chat_id
    with pytest.raises(grpc.aio.AioRpcError) as raised, grpc_errors():
        await alice.sdk.update_chat(chat_id, model="gpt-5")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and OTHER in (raised.value.details() or "")
    assert [c.model for c in (await alice.list()).chats] == [OTHER], "the chat kept its model"


async def test_a_chat_switched_to_another_model_sends_it_the_whole_history(
    channel: grpc.aio.Channel, engines: inference_pb2_grpc.InferenceServiceStub
) -> None:
    alice = ChatClient(channel)
    first_question = f"My name is Ada. ({uuid.uuid4().hex[:6]})"
    first = await alice.create(first_question, model=DEFAULT, **SHORT)
    assert await reply_model(alice, first.chat_id) == DEFAULT

    updated = await alice.sdk.update_chat(first.chat_id, model=OTHER)
    assert updated.model == OTHER
    second = await alice.complete(first.chat_id, "What is my name?", **SHORT)
    whole = [first_question, first.text, "What is my name?"]
    assert finished(second).usage.prompt_tokens == await prompt_tokens(engines, OTHER, whole)
    history = await alice.all_messages(first.chat_id)
    assert [(m.role, m.model) for m in history] == [
        (pb.ROLE_USER, ""),
        (pb.ROLE_ASSISTANT, DEFAULT),
        (pb.ROLE_USER, ""),
        (pb.ROLE_ASSISTANT, OTHER),
    ]


async def test_the_cache_never_serves_one_models_answer_for_another(
    channel: grpc.aio.Channel, chat: tuple[Service, str], embedding_service: tuple[str, LoggedProcess]
) -> None:
    vectors, collection = embedding_service[0], chat[1]
    alice = ChatClient(channel)

    async def stored(model: str) -> None:
        async def there() -> bool:
            return await cache_entries(vectors, collection, {"owner": alice.user, "model": model}) == 1

        await eventually(there, f"{model}'s answer was never cached")

    # Long enough to end by itself (only finished answers are cached), short enough to stay fast.
    ask = {"max_tokens": 48, "temperature": 0}
    answers: dict[str, str] = {}
    for model in MODELS:
        generated = await alice.create(QUESTION, model=model, **ask)
        assert not finished(generated).cached, f"{model} answered itself, not from another model's entry"
        assert finished(generated).finish_reason == pb.FINISH_REASON_STOP, generated.text
        assert await reply_model(alice, generated.chat_id) == model
        answers[model] = generated.text
        await stored(model)

    for model in MODELS:
        again = await alice.create(QUESTION, model=model, **ask)
        assert finished(again).cached and again.text == answers[model], f"{model}'s own answer"
        assert await reply_model(alice, again.chat_id) == model


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
    backend: str, two_models: Service, engines: inference_pb2_grpc.InferenceServiceStub, tmp_path: Path
) -> None:
    async with database(backend, tmp_path) as url:
        chat_id = await database_at_0006_with_a_chat(url, backend)
        with chat_service(url, two_models.address) as service:
            async with grpc.aio.insecure_channel(service.address) as channel:
                old = ChatClient(channel, user="old-user")
                (listed,) = (await old.list()).chats
                assert (listed.chat_id, listed.title, listed.model) == (str(chat_id), "old chat", DEFAULT)
                reply = await old.complete(str(chat_id), "And you?", **SHORT)
                whole = ["Hello.", "Hi there.", "And you?"]
                assert finished(reply).usage.prompt_tokens == await prompt_tokens(engines, DEFAULT, whole)
                history = await old.all_messages(str(chat_id))
                assert [(m.content, m.model) for m in history[:2]] == [("Hello.", ""), ("Hi there.", "")]
                assert history[-1].model == DEFAULT
