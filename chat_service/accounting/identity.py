"""Who calls: the chat service's authentication of every RPC, by a sign-in token or an API key.

`IdentityInterceptor` verifies the bearer of every call (but those of the open services: health,
reflection, the dev sign-in) and exposes the caller through `current_caller()` (and the user through
`chatmesh.common.auth.current_user()`) for the duration of the call.

- A sign-in token (issued by the identity provider, or the dev sign-in): the group is its
  `jwt_group_claim` claim (a string, or a list: its first; absent: ""); the caller is an admin when its
  `jwt_role_claim` claim (a string or a list) holds `admin_role`, or the user is one of `admin_users`.
- An API key (a JWT of the mesh's API-key issuer, see `chat_service.accounting.keys`): checked against the
  stored key (not revoked, the very secret issued) and its scopes, by service; keys never administer and
  never manage keys.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt

from chat_service.accounting.keys import ApiKeys
from chat_service.accounting.store import AccountStore
from chat_service.accounting.values import Caller, KeyScope
from chatmesh.chat.v1 import account_pb2, chat_pb2
from chatmesh.common.auth import PUBLIC_SERVICES, JwtKeys, bearer_token, set_current_user, verify_claims
from chatmesh.common.errors import PermissionDenied, Unauthenticated
from chatmesh.common.handlers import Context, WrappedHandlers, wrap_handler
from chatmesh.openai.v1 import openai_pb2

log = logging.getLogger(__name__)

_current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("chatmesh_caller")

_CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
_OPENAI_SERVICE = openai_pb2.DESCRIPTOR.services_by_name["OpenAIService"].full_name
_ACCOUNT_SERVICE = account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name

KEY_SCOPES: Mapping[str, KeyScope] = {
    f"/{_CHAT_SERVICE}/": KeyScope.CHAT,
    f"/{_OPENAI_SERVICE}/": KeyScope.OPENAI,
    f"/{_ACCOUNT_SERVICE}/GetUsage": KeyScope.USAGE,
}
"""The scope an API key needs, by method prefix; a method under none of them (key management, the
admin service) is refused to every key."""


def key_scope(method: str) -> KeyScope | None:
    """The scope an API key needs to call `method` (`/package.Service/Method`); None: no key may."""
    for prefix, scope in KEY_SCOPES.items():
        if method.startswith(prefix):
            return scope
    return None


def current_caller() -> Caller:
    """The authenticated caller of the RPC being served. Only valid inside a servicer method."""
    try:
        return _current_caller.get()
    except LookupError:
        raise Unauthenticated("no authenticated caller for this call") from None


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """How a sign-in token's claims name the group and the admins (`ChatSettings`' accounting section)."""

    group_claim: str = "group"
    role_claim: str = "role"
    admin_role: str = "admin"
    admin_users: frozenset[str] = field(default_factory=frozenset)

    def caller(self, claims: Mapping[str, Any]) -> Caller:
        """The caller a verified sign-in token's claims describe."""
        user_id = str(claims["sub"])
        group = claims.get(self.group_claim)
        if isinstance(group, list):
            group = group[0] if group else ""
        group = group if isinstance(group, str) else ""
        roles = claims.get(self.role_claim)
        role_list = roles if isinstance(roles, list) else [roles]
        admin = self.admin_role in role_list or user_id in self.admin_users
        return Caller(user_id=user_id, group=group[:255], admin=admin)


class IdentityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Verifies the bearer of every call of every kind (sign-in token or API key) except those of
    `open_services`, and sets the caller (`current_caller()`, `current_user()`) for the call."""

    def __init__(
        self,
        user_keys: JwtKeys,
        api_keys: ApiKeys,
        rules: IdentityRules,
        store: AccountStore | None = None,
        open_services: frozenset[str] = PUBLIC_SERVICES,
    ) -> None:
        self._user_keys = user_keys
        self._api_keys = api_keys
        self._rules = rules
        self._store = store
        self._open_services = open_services
        self._wrapped = WrappedHandlers()
        # The group this process last noted for each user: noted again only when a token says otherwise.
        self._noted: dict[str, str] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        service = method.lstrip("/").partition("/")[0]
        if handler is None or service in self._open_services:
            return handler

        def guard(context: Context) -> contextlib.AbstractAsyncContextManager[None]:
            return self._authenticated(method, context)

        return self._wrapped.get(method, handler, lambda: wrap_handler(handler, guard))

    async def authenticate(self, method: str, metadata: Collection[tuple[str, str | bytes]] | None) -> Caller:
        """The caller of `method` with this metadata, or `Unauthenticated` / `PermissionDenied`."""
        token = bearer_token(metadata)
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid bearer token: {exc}") from exc
        if self._api_keys.is_key(unverified):
            caller = await self._api_keys.check(token)
            needed = key_scope(method)
            if needed is None:
                raise PermissionDenied(
                    "an API key cannot manage keys or administer; use a sign-in token for this"
                )
            if needed not in caller.scopes:
                raise PermissionDenied(
                    f"this API key's scopes ({', '.join(sorted(caller.scopes))}) do not include"
                    f" `{needed}`, which this call needs; create a key with that scope"
                )
            return caller
        caller = self._rules.caller(verify_claims(self._user_keys, token))
        await self._note(caller)
        return caller

    async def _note(self, caller: Caller) -> None:
        if self._store is None or self._noted.get(caller.user_id) == caller.group:
            return
        await self._store.note_member(caller.user_id, caller.group)
        if len(self._noted) > 100_000:
            self._noted.clear()
        self._noted[caller.user_id] = caller.group

    @contextlib.asynccontextmanager
    async def _authenticated(self, method: str, context: Context) -> AsyncIterator[None]:
        # Entered inside the handler's own task, so the context variables are visible to the servicer.
        caller = await self.authenticate(method, context.invocation_metadata())
        _current_caller.set(caller)
        set_current_user(caller.user_id)
        yield
