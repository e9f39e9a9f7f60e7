"""API keys through the real mesh: Envoy (a second jwt_authn provider for keys) in front of two chat replicas
on one PostgreSQL database. A key is made over REST with a sign-in token, shown once, and used as the
bearer for REST, the OpenAI API (the `openai` SDK) and gRPC through Envoy; its scopes are enforced by
service; revoked, it is refused by both replicas; keys cannot manage keys; users cannot see or revoke each
other's keys; admins (by role claim, or by `CHATMESH_CHAT_ADMIN_USERS`) can; a forged key never reaches a
replica.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import jwt
import openai
import pytest

from chatmesh.chat.v1 import chat_pb2, chat_pb2_grpc
from chatmesh.common.auth import API_KEY_ISSUER, JwtKeys, issue_token
from tests.support.chat import TEST_SECRET, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.stack import Stack, chat_stack
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

KEY_SECRET = "api-key-secret-" + "k" * 40
ADMIN = "listed-admin"


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, inference_address: str) -> AsyncIterator[Stack]:
    async with (
        fresh_postgres_database() as url,
        chat_stack(
            inference_address,
            url,
            replicas=2,
            envoy_dir=tmp_path_factory.mktemp("envoy"),
            # The edge's rate limit is tested elsewhere; here it would only race the polling.
            gateway={"api_key_secret": KEY_SECRET, "rate_limit_per_s": 0},
            api_key_secret=KEY_SECRET,
            admin_users=[ADMIN],
        ) as stack,
    ):
        yield stack


@pytest.fixture
async def http(mesh: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.envoy.base_url, timeout=60.0) as client:
        yield client


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def create_key(http: httpx.AsyncClient, user_token: str, **body: Any) -> tuple[str, dict[str, Any]]:
    reply = await http.post("/keys", headers=bearer(user_token), json={"name": "tool", **body})
    assert reply.status_code == 200, reply.text
    created = reply.json()
    return created["secret"], created["key"]


async def list_chats_at(address: str, token: str) -> grpc.StatusCode:
    """ListChats at one replica directly (not through Envoy): OK or the status it refused with."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await chat_pb2_grpc.ChatServiceStub(channel).ListChats(
                chat_pb2.ListChatsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def upstream_requests(mesh: Stack) -> int:
    stats = await mesh.envoy.stats(r"^cluster\.chat\.upstream_rq_total$")
    return stats.get("cluster.chat.upstream_rq_total", 0)


async def test_a_key_is_the_bearer_for_rest_openai_and_grpc_and_is_shown_once(
    mesh: Stack, http: httpx.AsyncClient
) -> None:
    user = new_user()
    secret, key = await create_key(http, token_for(user))
    assert key["user_id"] == user and secret.startswith(key["prefix"]) and len(key["prefix"]) < len(secret)
    claims = jwt.decode(secret, options={"verify_signature": False})
    assert claims["sub"] == user and claims["jti"] == key["key_id"] and claims["iss"] == API_KEY_ISSUER
    assert "exp" not in claims and "scope" not in claims  # no expiry asked for; all scopes

    chats = await http.get("/chats", headers=bearer(secret))
    assert chats.status_code == 200, chats.text

    async with openai.AsyncOpenAI(base_url=f"{mesh.envoy.base_url}/v1", api_key=secret, max_retries=0) as sdk:
        assert [model.id async for model in sdk.models.list()]

    async with grpc.aio.insecure_channel(mesh.envoy.listen_address) as channel:
        reply = await chat_pb2_grpc.ChatServiceStub(channel).ListChats(
            chat_pb2.ListChatsRequest(), metadata=(("authorization", f"Bearer {secret}"),), timeout=10
        )
    assert list(reply.chats) == []

    listed = (await http.get("/keys", headers=bearer(token_for(user)))).json()["keys"]
    assert [k["key_id"] for k in listed] == [key["key_id"]]
    assert "secret" not in listed[0] and listed[0]["prefix"] == key["prefix"]
    assert secret not in str(listed)


async def test_an_openai_only_key_is_refused_on_chats_and_works_on_v1(
    mesh: Stack, http: httpx.AsyncClient
) -> None:
    secret, key = await create_key(
        http, token_for(new_user()), scopes=["KEY_SCOPE_OPENAI"], expires_in_days=30
    )
    assert key["scopes"] == ["KEY_SCOPE_OPENAI"] and "expire_time" in key
    assert jwt.decode(secret, options={"verify_signature": False})["scope"] == "openai"
    refused = await http.get("/chats", headers=bearer(secret))
    assert refused.status_code == 403, refused.text
    assert "openai" in refused.text and "chat" in refused.text
    models = await http.get("/v1/models", headers=bearer(secret))
    assert models.status_code == 200, models.text


async def test_a_key_cannot_manage_keys_or_administer(mesh: Stack, http: httpx.AsyncClient) -> None:
    user = new_user()
    secret, key = await create_key(http, token_for(user))
    for method, path in (
        ("POST", "/keys"),
        ("GET", "/keys"),
        ("DELETE", f"/keys/{key['key_id']}"),
        ("GET", f"/admin/users/{user}/keys"),
    ):
        reply = await http.request(method, path, headers=bearer(secret), json={"name": "more"})
        assert reply.status_code == 403, (method, path, reply.text)
        assert "sign-in token" in reply.text


async def test_a_revoked_key_is_refused_by_both_replicas(mesh: Stack, http: httpx.AsyncClient) -> None:
    user = new_user()
    secret, key = await create_key(http, token_for(user))
    replicas = [replica.address for replica in mesh.replicas]
    assert len(replicas) == 2
    for address in replicas:  # each replica has read (and cached) the key as usable
        assert await list_chats_at(address, secret) == grpc.StatusCode.OK

    revoked = await http.delete(f"/keys/{key['key_id']}", headers=bearer(token_for(user)))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["key"]["revoke_time"]

    for address in replicas:

        async def refused(address: str = address) -> bool:
            return bool(await list_chats_at(address, secret) == grpc.StatusCode.UNAUTHENTICATED)

        await eventually(refused, f"the revoked key is refused by the replica at {address}")
    through_envoy = await http.get("/chats", headers=bearer(secret))
    assert through_envoy.status_code == 401 and "revoked" in through_envoy.text
    # The user's sign-in token still works.
    assert (await http.get("/chats", headers=bearer(token_for(user)))).status_code == 200


async def test_users_cannot_see_or_revoke_each_others_keys(mesh: Stack, http: httpx.AsyncClient) -> None:
    alice, bob = new_user(), new_user()
    secret, key = await create_key(http, token_for(alice))
    bobs = (await http.get("/keys", headers=bearer(token_for(bob)))).json().get("keys", [])
    assert bobs == []
    taken = await http.delete(f"/keys/{key['key_id']}", headers=bearer(token_for(bob)))
    assert taken.status_code == 404, taken.text
    as_admin = await http.get(f"/admin/users/{alice}/keys", headers=bearer(token_for(bob)))
    assert as_admin.status_code == 403, as_admin.text
    assert (await http.get("/chats", headers=bearer(secret))).status_code == 200


@pytest.mark.parametrize("admin", ["role", "listed"])
async def test_an_admin_lists_and_revokes_a_users_keys(
    mesh: Stack, http: httpx.AsyncClient, admin: str
) -> None:
    user = new_user()
    first, _ = await create_key(http, token_for(user))
    second, _ = await create_key(http, token_for(user), name="other")
    admin_token = (
        issue_token(JwtKeys.hs256(TEST_SECRET), "role-admin", 3600, {"role": ["user", "admin"]})
        if admin == "role"
        else token_for(ADMIN)
    )
    listed = await http.get(f"/admin/users/{user}/keys", headers=bearer(admin_token))
    assert listed.status_code == 200, listed.text
    assert sorted(k["name"] for k in listed.json()["keys"]) == ["other", "tool"]

    revoked = await http.delete(f"/admin/users/{user}/keys", headers=bearer(admin_token))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked"] == 2
    for secret in (first, second):

        async def refused(secret: str = secret) -> bool:
            return (await http.get("/chats", headers=bearer(secret))).status_code == 401

        await eventually(refused, "the user's keys are refused once the admin revoked them")


async def test_forged_garbage_and_expired_bearers_are_refused_at_envoy(
    mesh: Stack, http: httpx.AsyncClient
) -> None:
    user = new_user()
    _, key = await create_key(http, token_for(user))
    claims = {"sub": user, "jti": key["key_id"], "iss": API_KEY_ISSUER, "iat": int(time.time())}
    forged = jwt.encode(claims, "another-secret-" + "f" * 40, algorithm="HS256")
    expired_user = issue_token(JwtKeys.hs256(TEST_SECRET), user, -3600)
    expired_key = issue_token(JwtKeys.hs256(KEY_SECRET, API_KEY_ISSUER), user, -3600, {"jti": key["key_id"]})
    before = await upstream_requests(mesh)
    for token in (forged, "garbage", expired_user, expired_key):
        reply = await http.get("/chats", headers=bearer(token))
        assert reply.status_code == 401, (token, reply.text)
    assert await upstream_requests(mesh) == before, "a refused bearer reached a replica"
