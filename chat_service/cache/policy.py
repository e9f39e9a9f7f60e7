"""What the semantic cache stores, for whom, and when it may answer: the policy in front of the vector
service.

Key. The embedded text is the question alone, so that paraphrases land near each other. Everything the
answer depended on besides the question is matched exactly, by hard payload filters, never mixed into
the embedded text:

- `scope`: the user (default), or `*` for a deployment that opts into a global scope; even then a chat
  with a system prompt of its own only ever shares with its user.
- `model`: the model that answers the question (the chat's, or the one a stateless request names):
  another model would answer differently, so one model's answer is never served for another.
- `system_prompt_hash` and `context_hash`: the system prompt, and the system prompt plus every turn
  before the question (SHA-256 of their JSON). A follow-up ("how old is he?") only hits an answer given
  after the very same conversation, so it can never be served an answer about someone else; a first
  question (no turns before it) can hit across the user's chats with the same system prompt.
- `expires_at`: entries older than the TTL never match, and a periodic purge deletes them.

The owner's deletes (a deleted chat, ClearCache) name the scope exactly too, so the vector index
visits only the caller's entries (see `_delete_owned`).

Verification. The vector service returns the best few entries of that scope; `VerificationRule` decides
whether the best one truly asks the same thing (see docs/cache-verification.md).

Failures. A lookup that fails or takes longer than its budget is a miss: the user gets a generated
answer, and the failure is logged and counted. Storing and deleting happen off the answer's path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from chat_service.cache.verification import Candidate, VerificationRule
from chat_service.metrics import ChatMetrics, NoMetrics
from chatmesh.vectors.client import Hit, NewPoint, VectorClient, Where
from chatmesh.vectors.values import PayloadValue, Range

log = logging.getLogger(__name__)

GLOBAL_SCOPE = "*"

Scope = Literal["user", "global"]


def user_scope(user_id: str) -> str:
    """The scope value of `user_id`'s own entries, never equal to the global scope's.

    A token's subject may be any text, `*` included; that user's entries must not mix with the global
    scope's. The escape starts with a control character, which no subject contains (`verify_token` refuses
    them), so no other user's scope can equal it either.
    """
    return f"\x1f{user_id}" if user_id == GLOBAL_SCOPE else user_id


@dataclass(frozen=True, slots=True)
class Question:
    """A question as the cache sees it: who asks, in which chat, after what, of which model."""

    user_id: str
    chat_id: uuid.UUID | None
    """None for the first question of a chat that is being created (looked up before it is stored), and
    for a stateless completion (no chat at all)."""
    system_prompt: str
    earlier_turns: Sequence[tuple[str, str]]
    """(role, content) of every message before the question, oldest first."""
    text: str
    model: str
    """The served model that answers it (a resolved name, never "" for the default: a chat that follows
    the default and one that names it share their answers)."""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A stored answer that may be served for a question."""

    entry_id: str
    text: str
    token_count: int
    """Completion tokens the answer took when it was generated (stored with the history)."""
    matched_question: str
    score: float


class ResponseCache(Protocol):
    """The cache as the chat use cases see it."""

    async def lookup(self, question: Question) -> CachedAnswer | None:
        """A verified answer to `question`, or None (a miss, also when the cache is unavailable)."""
        ...

    async def store(self, question: Question, answer: str, token_count: int) -> None:
        """Keep a finished (`stop`) answer to `question`."""
        ...

    async def forget_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        """Delete the entries a deleted chat stored."""
        ...

    async def clear(self, user_id: str) -> int:
        """Delete every entry `user_id` stored; returns how many."""
        ...


class NoCache:
    """The cache switched off: every lookup misses and nothing is kept."""

    async def lookup(self, question: Question) -> CachedAnswer | None:
        return None

    async def store(self, question: Question, answer: str, token_count: int) -> None:
        return None

    async def forget_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        return None

    async def clear(self, user_id: str) -> int:
        return 0


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The settings of `SemanticCache`."""

    scope: Scope = "user"
    ttl_s: float = 7 * 24 * 3600.0
    lookup_timeout_s: float = 0.05
    candidates: int = 5
    collection: str = "chat_answers"


class SemanticCache:
    """`ResponseCache` over the vector service, with the scope, key and verification described above.

    The client's own deadlines bound each call (a search within `lookup_timeout_s`, see the root)."""

    def __init__(
        self,
        vectors: VectorClient,
        policy: CachePolicy,
        rule: VerificationRule,
        metrics: ChatMetrics | None = None,
    ) -> None:
        self._vectors = vectors
        self._policy = policy
        self._rule = rule
        self._metrics = metrics or NoMetrics()
        self.failures = 0
        """Lookups and writes that failed or ran out of time (each also logged)."""

    @property
    def collection(self) -> str:
        """The vector collection the entries live in."""
        return self._policy.collection

    def _scope(self, question: Question) -> str:
        if self._policy.scope == "global" and not question.system_prompt:
            return GLOBAL_SCOPE
        return user_scope(question.user_id)

    def _key(self, question: Question) -> dict[str, str]:
        """The exact-match part of an entry's key: the payload values a lookup filters on."""
        return {
            "scope": self._scope(question),
            "model": question.model,
            "system_prompt_hash": _digest(question.system_prompt),
            "context_hash": _digest([question.system_prompt, [list(t) for t in question.earlier_turns]]),
        }

    def _failed(self, what: str, exc: BaseException, question: Question | None = None) -> None:
        self.failures += 1
        log.warning(
            "semantic cache %s failed; going on without it",
            what,
            extra={
                "error": f"{type(exc).__name__}: {exc}",
                "failures": self.failures,
                "chat_id": str(question.chat_id) if question and question.chat_id else None,
            },
        )

    async def search(self, question: Question) -> list[Hit]:
        """The unexpired entries in `question`'s scope nearest to it, best first (raises on failure)."""
        where: Where = {**self._key(question), "expires_at": Range(gt=time.time())}
        return await self._vectors.search(
            self._policy.collection, question.text, where=where, limit=self._policy.candidates
        )

    def answer(self, question: Question, hits: Sequence[Hit]) -> CachedAnswer | None:
        """The answer among `hits` that the verification rule lets `question` be served, if any."""
        candidates = [Candidate(hit.score, str(hit.payload.get("question", ""))) for hit in hits]
        chosen = self._rule.choose(question.text, candidates)
        if chosen is None:
            return None
        hit = hits[chosen]
        return CachedAnswer(
            entry_id=hit.id,
            text=str(hit.payload.get("answer", "")),
            token_count=int(hit.payload.get("token_count", 0)),
            matched_question=candidates[chosen].question,
            score=hit.score,
        )

    async def lookup(self, question: Question) -> CachedAnswer | None:
        started = time.perf_counter()
        try:
            # The whole lookup is bounded, not only the RPC: a slow channel (reconnecting to a dead
            # service) must not hold up the answer either.
            async with asyncio.timeout(self._policy.lookup_timeout_s):
                hits = await self.search(question)
        except Exception as exc:  # any failure of the cache is a miss, never the user's error
            self._failed("lookup", exc, question)
            self._metrics.cache_lookup("error")
            return None
        found = self.answer(question, hits)
        self._metrics.cache_lookup("miss" if found is None else "hit")
        log.debug(
            "cache lookup",
            extra={
                "chat_id": str(question.chat_id) if question.chat_id else None,
                "hit": found is not None,
                "candidates": len(hits),
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
        return found

    def entry(self, question: Question, answer: str, token_count: int) -> NewPoint:
        """The cache entry that keeps `answer` to `question`. An answer of the stateless (OpenAI-compatible)
        API belongs to no chat (`chat_id` ""): it leaves with its TTL or the user's ClearCache."""
        now = time.time()
        payload: dict[str, PayloadValue] = {
            **self._key(question),
            "owner": question.user_id,
            "chat_id": str(question.chat_id) if question.chat_id else "",
            "question": question.text,
            "answer": answer,
            "token_count": token_count,
            "created_at": now,
            "expires_at": now + self._policy.ttl_s,
        }
        return NewPoint(uuid.uuid4(), question.text, payload)

    async def store(self, question: Question, answer: str, token_count: int) -> None:
        try:
            await self._vectors.upsert(self._policy.collection, [self.entry(question, answer, token_count)])
        except Exception as exc:
            self._failed("store", exc, question)

    async def _delete_owned(self, user_id: str, where: Where) -> int:
        """Delete the entries `user_id` stored that pass `where`, in each scope they can be in: the user's
        own and the global one. Every delete names its scope exactly: the vector index keeps each scope
        apart (in local mode a partition of its own, searched on one thread), and a delete without it
        would visit every user's entries. The global scope is cleared whatever the setting, so entries
        stored while it was on go too."""
        deleted = 0
        for scope in (user_scope(user_id), GLOBAL_SCOPE):
            deleted += await self._vectors.delete(
                self._policy.collection, {"scope": scope, "owner": user_id, **where}
            )
        return deleted

    async def forget_chat(self, user_id: str, chat_id: uuid.UUID) -> None:
        try:
            await self._delete_owned(user_id, {"chat_id": str(chat_id)})
        except Exception as exc:
            self._failed("delete of a chat's entries", exc)

    async def clear(self, user_id: str) -> int:
        """Unlike the other writes, a failed clear is the caller's error: they asked for it."""
        return await self._delete_owned(user_id, {})

    async def purge_expired(self) -> int:
        """Delete every expired entry (lookups already ignore them; this reclaims the space)."""
        try:
            return await self._vectors.delete(self._policy.collection, {"expires_at": Range(lte=time.time())})
        except Exception as exc:
            self._failed("purge", exc)
            return 0
