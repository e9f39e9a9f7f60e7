"""The cache policy's key, scope and failure handling, over an in-memory vector client."""

from __future__ import annotations

import uuid

from chat_service.cache.policy import GLOBAL_SCOPE, CachePolicy, Question, SemanticCache
from chat_service.cache.verification import VerificationRule
from chatmesh.common.errors import Unavailable
from tests.support.fakes import MemoryVectors


def question(user: str = "alice", text: str = "What is the capital of France?", **fields: object) -> Question:
    values: dict[str, object] = {
        "user_id": user,
        "chat_id": uuid.uuid4(),
        "system_prompt": "",
        "earlier_turns": (),
        "text": text,
        "model": "m",
    }
    values.update(fields)
    return Question(**values)  # type: ignore[arg-type]


def cache(vectors: MemoryVectors, **policy: object) -> SemanticCache:
    return SemanticCache(vectors, CachePolicy(**policy), VerificationRule())  # type: ignore[arg-type]


async def test_an_answer_is_found_by_its_asker_in_the_same_context_only() -> None:
    vectors = MemoryVectors()
    store = cache(vectors)
    asked = question()
    await store.store(asked, "Paris.", 3)
    found = await store.lookup(question())
    assert found is not None and found.text == "Paris." and found.token_count == 3
    assert await store.lookup(question(user="bob")) is None, "another user"
    assert await store.lookup(question(system_prompt="Be terse.")) is None, "another system prompt"
    after_other_turns = question(earlier_turns=(("user", "Hi"), ("assistant", "Hello")))
    assert await store.lookup(after_other_turns) is None, "another conversation before the question"
    assert await store.lookup(question(model="other")) is None, "another model"


async def test_a_global_scope_shares_only_chats_without_a_system_prompt() -> None:
    vectors = MemoryVectors()
    store = cache(vectors, scope="global")
    await store.store(question(), "Paris.", 3)
    await store.store(question(text="Say hello.", system_prompt="Be terse."), "Hello.", 2)
    assert await store.lookup(question(user="bob")) is not None
    assert await store.lookup(question(user="bob", text="Say hello.", system_prompt="Be terse.")) is None
    scopes = sorted(str(p.payload["scope"]) for p in vectors.points.values())
    assert scopes == sorted([GLOBAL_SCOPE, "alice"])


async def test_a_user_named_like_the_global_scope_shares_nothing_with_it() -> None:
    """A token's `sub` may be `*`, the global scope's name: that user's entries stay theirs, and what the
    global scope holds is never served to them under the per-user default."""
    vectors = MemoryVectors()
    await cache(vectors, scope="global").store(question(user="bob"), "Paris.", 3)
    per_user = cache(vectors)
    assert await per_user.lookup(question(user=GLOBAL_SCOPE)) is None, "served the global scope's entry"
    await per_user.store(question(user=GLOBAL_SCOPE, text="Say hello."), "Hello.", 2)
    assert await cache(vectors, scope="global").lookup(question(user="bob", text="Say hello.")) is None
    await per_user.clear(GLOBAL_SCOPE)
    assert [p.payload["owner"] for p in vectors.points.values()] == ["bob"], "the global entry survives"


async def test_expired_entries_are_filtered_at_lookup_and_purged() -> None:
    vectors = MemoryVectors()
    store = cache(vectors, ttl_s=-1.0)  # already expired when stored
    await store.store(question(), "Paris.", 3)
    assert await store.lookup(question()) is None
    assert "expires_at" in vectors.searches[-1]
    assert await store.purge_expired() == 1 and not vectors.points


async def test_failures_and_slow_lookups_are_misses_and_counted() -> None:
    vectors = MemoryVectors()
    store = cache(vectors, lookup_timeout_s=0.01)
    await store.store(question(), "Paris.", 3)
    vectors.fail = Unavailable("vector service down")
    assert await store.lookup(question()) is None
    vectors.fail = None
    vectors.delay_s = 1.0  # far beyond the 10 ms budget
    assert await store.lookup(question()) is None
    assert store.failures == 2


async def test_forgetting_a_chat_and_clearing_a_user_delete_only_theirs() -> None:
    vectors = MemoryVectors()
    store = cache(vectors)
    chat = uuid.uuid4()
    await store.store(question(chat_id=chat), "Paris.", 3)
    await store.store(question(text="Say hello."), "Hello.", 2)
    await store.store(question(user="bob"), "Paris.", 3)
    await store.forget_chat("alice", chat)
    assert len(vectors.points) == 2
    assert await store.clear("alice") == 1
    assert [p.payload["owner"] for p in vectors.points.values()] == ["bob"]
