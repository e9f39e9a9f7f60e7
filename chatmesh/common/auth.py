"""JWT identity: verifying bearer tokens on the server, issuing dev tokens from the CLI.

The token's `sub` claim is the user id. HS256 (shared secret) suits a single machine; RS256 (public
key to verify, private key to issue) lets a separate identity provider mint tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt

from chatmesh.common.errors import Unauthenticated
from chatmesh.common.handlers import Context, WrappedHandlers, wrap_handler

_current_user: contextvars.ContextVar[str] = contextvars.ContextVar("chatmesh_user")

# Infrastructure endpoints stay open: load balancers health-check and operators reflect without tokens.
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


JWT_LEEWAY_S = 30
"""Seconds a token's `exp`, `nbf` and `iat` may be off (clocks drift): the default of every part's
`JWT_CLOCK_SKEW_S` (`chatmesh.common.auth_settings.JwtSettings`), so the chat service's check and Envoy's
at the edge accept the same tokens."""


@dataclass(frozen=True, slots=True)
class JwtKeys:
    """Key material and rules for tokens. Exactly one of `secret` / `public_key` verifies."""

    algorithm: str  # "HS256" or "RS256"
    verify_key: str
    sign_key: str | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_s: float = JWT_LEEWAY_S

    @classmethod
    def hs256(
        cls,
        secret: str,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = JWT_LEEWAY_S,
    ) -> JwtKeys:
        if len(secret) < 32:
            raise ValueError(
                "the JWT secret must be at least 32 characters; generate one with `chatmesh keygen`"
            )
        return cls("HS256", secret, secret, issuer, audience, leeway_s)

    @classmethod
    def rs256(
        cls,
        public_key_pem: str,
        private_key_pem: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = JWT_LEEWAY_S,
    ) -> JwtKeys:
        return cls("RS256", public_key_pem, private_key_pem, issuer, audience, leeway_s)


def current_user() -> str:
    """The authenticated user of the RPC being served. Only valid inside a servicer method."""
    try:
        return _current_user.get()
    except LookupError:
        raise Unauthenticated("no authenticated user for this call") from None


def set_current_user(user_id: str) -> None:
    """Make `user_id` the authenticated user of the call being served (for an interceptor that verifies
    tokens itself, inside the handler's own task)."""
    _current_user.set(user_id)


def verify_token(keys: JwtKeys, token: str) -> str:
    """Return the token's subject, or raise `Unauthenticated` saying what is wrong with it."""
    return str(verify_claims(keys, token)["sub"])


def verify_claims(keys: JwtKeys, token: str, *, require_exp: bool = True) -> dict[str, Any]:
    """Return the token's verified claims (with a valid `sub`), or raise `Unauthenticated` saying what is
    wrong with it. `require_exp` False: a token without `exp` never expires (an API key's)."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            keys.verify_key,
            algorithms=[keys.algorithm],
            issuer=keys.issuer,
            audience=keys.audience,
            leeway=keys.leeway_s,
            options={
                "require": ["sub", "exp"] if require_exp else ["sub"],
                "verify_aud": keys.audience is not None,
            },
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("the bearer token has expired; get a new one") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"invalid bearer token: {exc}") from exc
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject or len(subject) > 255:
        raise Unauthenticated("the bearer token's `sub` must be a user id of 1 to 255 characters")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in subject):
        # A user id is stored and logged as text: NUL is refused by PostgreSQL, and control characters
        # would forge log lines. No identity provider issues them.
        raise Unauthenticated("the bearer token's `sub` must not contain control characters")
    return claims


def issue_token(
    keys: JwtKeys,
    user_id: str,
    ttl_s: float | None = 30 * 24 * 3600,
    extra_claims: dict[str, Any] | None = None,
) -> str:
    """Sign a token for `user_id` (dev and tests; production tokens come from an identity provider), with
    `extra_claims` (a group, roles, ...) added. `ttl_s` None: no `exp` (API keys only)."""
    if keys.sign_key is None:
        raise ValueError("no signing key configured: RS256 needs the private key to issue tokens")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now}
    if ttl_s is not None:
        claims["exp"] = now + int(ttl_s)
    claims.update(extra_claims or {})
    if keys.issuer:
        claims["iss"] = keys.issuer
    if keys.audience:
        claims["aud"] = keys.audience
    return jwt.encode(claims, keys.sign_key, algorithm=keys.algorithm)


def bearer_token(metadata: Collection[tuple[str, str | bytes]] | None) -> str:
    """The token from `authorization: Bearer <token>` metadata, or `Unauthenticated`."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("the authorization header must be `Bearer <token>`")
    raise Unauthenticated(
        "missing `authorization: Bearer <token>` metadata; get a token with `chatmesh token USER`"
    )


def generate_secret() -> str:
    """A fresh random HS256 secret."""
    return secrets.token_urlsafe(48)


DEV_SECRET_FILE = Path(".run/jwt-secret")
"""The mesh's own HS256 secret (`make run`), created on first use: the default of every service, and the
only key with which the dev sign-in runs."""


API_KEY_SECRET_FILE = Path(".run/api-key-secret")
"""The mesh's HS256 secret for API keys (bearer JWTs it issues itself), created on first use."""

API_KEY_ISSUER = "chatmesh-api-key"
"""The `iss` of API keys: tells them apart from sign-in tokens at the edge and at the replicas."""


def load_or_create_secret(path: Path) -> str:
    """Read the dev secret at `path`, creating it (mode 600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(generate_secret())
    return path.read_text().strip()


def read_secret(path: Path, setting: str) -> str:
    """The HS256 secret already at `path`, never one made up here: a secret created by whoever asks for a
    token (a command run outside the mesh's directory) signs tokens that no running mesh accepts.
    `FileNotFoundError` naming `setting`, the setting that points at the mesh's secret, when it is missing."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no JWT secret at {path.absolute()} (none was created): the mesh writes its secret under the"
            f" directory it runs in (`make run`, `chatmesh run`); run this command there, or set {setting}"
            " to the mesh's secret file"
        ) from None


class JwtAuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the bearer token of every call of every kind (except those of `open_services`: health and
    reflection by default) and exposes the user through `current_user()` for the duration of the call."""

    def __init__(self, keys: JwtKeys, open_services: frozenset[str] = PUBLIC_SERVICES) -> None:
        self._keys = keys
        self._open_services = open_services
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if handler is None or service in self._open_services:
            return handler
        return self._wrapped.get(
            handler_call_details.method, handler, lambda: wrap_handler(handler, self._authenticated)
        )

    @contextlib.asynccontextmanager
    async def _authenticated(self, context: Context) -> AsyncIterator[None]:
        # Entered inside the handler's own task, so the context variable is visible to the servicer.
        _current_user.set(verify_token(self._keys, bearer_token(context.invocation_metadata())))
        yield
