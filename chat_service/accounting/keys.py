"""API keys: long-lived bearer secrets a user makes for tools (the `openai` SDK, scripts).

A key's secret is a JWT (HS256) signed with the mesh's API-key secret (`JwtSettings.api_key_keys`), so
Envoy verifies it at the edge like a sign-in token (and rate-limits its user); claims: `sub` (the user),
`jti` (the key's id), `iss`, `iat`, `scope` (space-separated `KeyScope`s, absent: all), `grp` (the user's
group when it was made) and `exp` only when the key expires. The store keeps only the SHA-256 of the
secret: a replica checks that the bearer is the very secret issued (not another token with the same id)
and that the key is not revoked, reading the key at most every `cache_s` seconds.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from chat_service.accounting.store import AccountStore
from chat_service.accounting.values import ALL_KEY_SCOPES, ApiKeyRecord, Caller, KeyScope
from chatmesh.common.auth import JwtKeys, issue_token, verify_claims
from chatmesh.common.errors import Unauthenticated

PREFIX_CHARS = 12
"""The characters of a secret a listing shows (enough to tell keys apart; useless to sign in with)."""


def secret_hash(secret: str) -> str:
    """What the store keeps of a key's secret: the SHA-256 hex of the bearer string."""
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeys:
    """Create, list, revoke and check API keys, over an `AccountStore`."""

    def __init__(self, store: AccountStore, keys: JwtKeys, cache_s: float = 2.0) -> None:
        self._store = store
        self._keys = keys
        self._cache_s = cache_s
        # key id -> (the record as read, or None when absent; when it was read, monotonic seconds)
        self._cache: dict[uuid.UUID, tuple[ApiKeyRecord | None, float]] = {}

    @property
    def issuer(self) -> str | None:
        """The `iss` every key carries."""
        return self._keys.issuer

    async def create(
        self, caller: Caller, name: str, scopes: frozenset[KeyScope], expires_in_days: int
    ) -> tuple[ApiKeyRecord, str]:
        """Make a key for the caller (scopes empty: all; `expires_in_days` 0: never expires); returns it
        with its secret, which is not stored and cannot be shown again."""
        key_id = uuid.uuid4()
        now = datetime.now(UTC).replace(microsecond=0)
        expires_at = now + timedelta(days=expires_in_days) if expires_in_days > 0 else None
        claims: dict[str, Any] = {"jti": str(key_id), "grp": caller.group}
        if scopes and scopes != ALL_KEY_SCOPES:
            claims["scope"] = " ".join(sorted(scopes))
        ttl_s = (expires_at - now).total_seconds() if expires_at is not None else None
        secret = issue_token(self._keys, caller.user_id, ttl_s, claims)
        record = ApiKeyRecord(
            id=key_id,
            user_id=caller.user_id,
            group=caller.group,
            name=name,
            scopes=scopes or ALL_KEY_SCOPES,
            prefix=secret[:PREFIX_CHARS],
            secret_hash=secret_hash(secret),
            created_at=now,
            expires_at=expires_at,
        )
        await self._store.create_key(record)
        return record, secret

    async def list(self, user_id: str) -> Sequence[ApiKeyRecord]:
        """The user's keys, newest first, revoked ones included."""
        return await self._store.list_keys(user_id)

    async def revoke(self, user_id: str, key_id: uuid.UUID | None) -> Sequence[ApiKeyRecord]:
        """Revoke the user's key (None: all of them); refused here at once, on other replicas within
        `cache_s`. `NotFound` when `key_id` is not the user's."""
        revoked = await self._store.revoke_keys(user_id, key_id, datetime.now(UTC))
        for record in revoked:
            self._cache.pop(record.id, None)
        return revoked

    def is_key(self, claims: dict[str, Any]) -> bool:
        """Whether unverified `claims` are an API key's (its issuer): which key verifies it."""
        return claims.get("iss") == self._keys.issuer

    async def check(self, token: str) -> Caller:
        """The caller a bearer API key stands for, or `Unauthenticated`: its signature, that it is the
        secret issued for its id, and that the key is neither revoked nor expired."""
        claims = verify_claims(self._keys, token, require_exp=False)
        try:
            key_id = uuid.UUID(str(claims.get("jti", "")))
        except ValueError:
            raise Unauthenticated("invalid API key: no key id") from None
        record = await self._record(key_id)
        if record is None or record.secret_hash != secret_hash(token) or record.user_id != claims["sub"]:
            raise Unauthenticated("unknown API key; create one with POST /keys")
        now = datetime.now(UTC)
        if record.revoked_at is not None:
            raise Unauthenticated("this API key was revoked; create a new one")
        if not record.usable(now):
            raise Unauthenticated("this API key has expired; create a new one")
        return Caller(
            user_id=record.user_id, group=record.group, admin=False, key_id=record.id, scopes=record.scopes
        )

    async def _record(self, key_id: uuid.UUID) -> ApiKeyRecord | None:
        cached = self._cache.get(key_id)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self._cache_s:
            return cached[0]
        record = await self._store.get_key(key_id)
        if len(self._cache) > 100_000:  # bounded: forged ids are refused at the edge, but be safe
            self._cache.clear()
        self._cache[key_id] = (record, now)
        return record
