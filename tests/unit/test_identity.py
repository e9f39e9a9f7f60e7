"""The caller's identity at a replica: sign-in tokens (group and admin from their claims) and API keys
(checked against the stored key, scopes by service), over the SQL accounting store on SQLite."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from chat_service.accounting.identity import IdentityInterceptor, IdentityRules, key_scope
from chat_service.accounting.keys import ApiKeys, secret_hash
from chat_service.accounting.values import ALL_KEY_SCOPES, Caller, KeyScope
from chat_service.storage.sql import SqlAccountStore, open_sql_store
from chatmesh.common.auth import API_KEY_ISSUER, JwtKeys, issue_token
from chatmesh.common.errors import PermissionDenied, Unauthenticated

USER_KEYS = JwtKeys.hs256("user-secret-" + "u" * 40)
API_KEYS = JwtKeys.hs256("api-key-secret-" + "k" * 40, API_KEY_ISSUER)
RULES = IdentityRules("grp_claim", "roles", "boss", frozenset({"listed"}))

CHATS = "/chatmesh.chat.v1.ChatService/ListChats"
OPENAI = "/chatmesh.openai.v1.OpenAIService/ListModels"
USAGE = "/chatmesh.chat.v1.AccountService/GetUsage"
CREATE_KEY = "/chatmesh.chat.v1.AccountService/CreateKey"
ADMIN = "/chatmesh.chat.v1.AdminService/ListUserKeys"


class NotingStore(SqlAccountStore):
    """The SQL store, counting the memberships it is asked to note."""

    noted: list[tuple[str, str]]

    async def note_member(self, user_id: str, group: str) -> None:
        self.noted.append((user_id, group))
        await super().note_member(user_id, group)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NotingStore]:
    async with open_sql_store(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", migrate=True) as chats:
        noting = NotingStore(chats.database)
        noting.noted = []
        yield noting


@pytest.fixture
def keys(store: NotingStore) -> ApiKeys:
    return ApiKeys(store, API_KEYS, cache_s=3600)  # a long cache: revocation here must not wait for it


@pytest.fixture
def identity(store: NotingStore, keys: ApiKeys) -> IdentityInterceptor:
    return IdentityInterceptor(USER_KEYS, keys, RULES, store)


def metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def user_token(user: str, **claims: Any) -> str:
    return issue_token(USER_KEYS, user, 3600, claims)


@pytest.mark.parametrize(
    ("claims", "group", "admin"),
    [
        ({}, "", False),
        ({"grp_claim": "team-a"}, "team-a", False),
        ({"grp_claim": ["team-b", "team-c"]}, "team-b", False),
        ({"grp_claim": []}, "", False),
        ({"grp_claim": 7}, "", False),
        ({"roles": "boss"}, "", True),
        ({"roles": ["user", "boss"], "grp_claim": "x"}, "x", True),
        ({"roles": ["user", "admin"]}, "", False),  # the configured admin role, not the word
    ],
)
async def test_a_sign_in_tokens_group_and_admin_come_from_its_claims(
    identity: IdentityInterceptor, claims: dict[str, Any], group: str, admin: bool
) -> None:
    caller = await identity.authenticate(CHATS, metadata(user_token("ada", **claims)))
    assert caller == Caller("ada", group, admin)


async def test_a_listed_user_is_an_admin_whatever_the_token_says(identity: IdentityInterceptor) -> None:
    assert (await identity.authenticate(ADMIN, metadata(user_token("listed")))).admin


async def test_the_group_is_noted_once_and_again_when_it_changes(
    identity: IdentityInterceptor, store: NotingStore
) -> None:
    for group in ("a", "a", "b", "b", "a"):
        await identity.authenticate(CHATS, metadata(user_token("ada", grp_claim=group)))
    assert store.noted == [("ada", "a"), ("ada", "b"), ("ada", "a")]


async def test_bad_sign_in_tokens_are_unauthenticated(identity: IdentityInterceptor) -> None:
    for token in (
        "garbage",
        issue_token(USER_KEYS, "ada", -3600),
        issue_token(JwtKeys.hs256("other-secret-" + "o" * 40), "ada"),
    ):
        with pytest.raises(Unauthenticated):
            await identity.authenticate(CHATS, metadata(token))
    with pytest.raises(Unauthenticated):
        await identity.authenticate(CHATS, [])


def test_the_scope_a_key_needs_by_method() -> None:
    assert key_scope(CHATS) is KeyScope.CHAT
    assert key_scope(OPENAI) is KeyScope.OPENAI
    assert key_scope(USAGE) is KeyScope.USAGE
    assert key_scope(CREATE_KEY) is None and key_scope(ADMIN) is None


async def test_a_key_stands_for_its_user_within_its_scopes_and_never_manages_keys(
    identity: IdentityInterceptor, keys: ApiKeys, store: NotingStore
) -> None:
    record, secret = await keys.create(Caller("ada", "team", admin=True), "tool", frozenset(), 0)
    assert record.scopes == ALL_KEY_SCOPES and record.secret_hash == secret_hash(secret)
    assert record.expires_at is None and secret.startswith(record.prefix)
    assert (await store.get_key(record.id)) == record
    for method in (CHATS, OPENAI, USAGE):
        caller = await identity.authenticate(method, metadata(secret))
        # Keys never carry admin rights, whoever made them.
        assert caller == Caller("ada", "team", False, record.id, ALL_KEY_SCOPES)
    for method in (CREATE_KEY, ADMIN):
        with pytest.raises(PermissionDenied, match="sign-in token"):
            await identity.authenticate(method, metadata(secret))
    assert store.noted == []  # a key names no group of its own to note

    _, openai_only = await keys.create(Caller("ada"), "sdk", frozenset({KeyScope.OPENAI}), 30)
    assert (await identity.authenticate(OPENAI, metadata(openai_only))).scopes == {KeyScope.OPENAI}
    with pytest.raises(PermissionDenied, match="`chat`"):
        await identity.authenticate(CHATS, metadata(openai_only))


async def test_a_revoked_key_is_refused_at_once_by_the_replica_that_revoked_it(
    identity: IdentityInterceptor, keys: ApiKeys
) -> None:
    record, secret = await keys.create(Caller("ada"), "tool", frozenset(), 0)
    await identity.authenticate(CHATS, metadata(secret))  # read, and cached for an hour
    await keys.revoke("ada", record.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await identity.authenticate(CHATS, metadata(secret))


async def test_only_the_secret_issued_for_a_key_id_is_that_key(
    identity: IdentityInterceptor, keys: ApiKeys
) -> None:
    record, secret = await keys.create(Caller("ada"), "tool", frozenset(), 0)
    claims = jwt.decode(secret, options={"verify_signature": False})
    # Signed with the key secret (as a leaked secret could), but not the stored one: another scope.
    other = jwt.encode({**claims, "scope": "usage"}, API_KEYS.verify_key, algorithm="HS256")
    unknown = issue_token(API_KEYS, "ada", None, {"jti": str(uuid.uuid4())})
    expired = issue_token(API_KEYS, "ada", -3600, {"jti": str(record.id)})
    forged = jwt.encode(claims, "forged-secret-" + "f" * 40, algorithm="HS256")
    for token in (other, unknown, expired, forged):
        with pytest.raises(Unauthenticated):
            await identity.authenticate(CHATS, metadata(token))
