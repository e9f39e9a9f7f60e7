"""The API-key methods of AccountService and AdminService (protobuf in, protobuf out)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from chat_service.accounting.identity import current_caller
from chat_service.accounting.values import ApiKeyRecord, KeyScope
from chatmesh.chat.v1 import account_pb2 as pb
from chatmesh.common.errors import InvalidArgument, PermissionDenied

if TYPE_CHECKING:
    from chat_service.accounting.keys import ApiKeys

MAX_NAME_CHARS = 100
MAX_EXPIRES_IN_DAYS = 3650

_SCOPES = {
    pb.KEY_SCOPE_CHAT: KeyScope.CHAT,
    pb.KEY_SCOPE_OPENAI: KeyScope.OPENAI,
    pb.KEY_SCOPE_USAGE: KeyScope.USAGE,
}
_SCOPES_PB = {scope: value for value, scope in _SCOPES.items()}


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def key_pb(record: ApiKeyRecord) -> pb.ApiKey:
    """A key as the API shows it: never its secret, only its first characters."""
    return pb.ApiKey(
        key_id=str(record.id),
        name=record.name,
        scopes=sorted(_SCOPES_PB[scope] for scope in record.scopes),
        prefix=record.prefix,
        create_time=_timestamp(record.created_at),
        expire_time=_timestamp(record.expires_at),
        revoke_time=_timestamp(record.revoked_at),
        user_id=record.user_id,
        group=record.group,
    )


def _key_id(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, "must be a key id (a UUID, as ListKeys shows it)") from None


def _user_id(value: str) -> str:
    if not value or len(value) > 255:
        raise InvalidArgument("user_id", "must be a user id of 1 to 255 characters")
    return value


class KeyMethods:
    """AccountService.CreateKey, ListKeys, RevokeKey: the caller's own keys (only with a sign-in token:
    the identity interceptor refuses these to API keys)."""

    _keys: ApiKeys

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Any) -> pb.CreateKeyResponse:
        name = request.name.strip()
        if not 1 <= len(name) <= MAX_NAME_CHARS:
            raise InvalidArgument("name", f"must be 1 to {MAX_NAME_CHARS} characters")
        if not 0 <= request.expires_in_days <= MAX_EXPIRES_IN_DAYS:
            raise InvalidArgument(
                "expires_in_days", f"must be 0 (never expires) to {MAX_EXPIRES_IN_DAYS} days"
            )
        scopes = set()
        for index, value in enumerate(request.scopes):
            if value not in _SCOPES:
                raise InvalidArgument(f"scopes[{index}]", "must be KEY_SCOPE_CHAT, _OPENAI or _USAGE")
            scopes.add(_SCOPES[value])
        record, secret = await self._keys.create(
            current_caller(), name, frozenset(scopes), request.expires_in_days
        )
        return pb.CreateKeyResponse(key=key_pb(record), secret=secret)

    async def ListKeys(self, request: pb.ListKeysRequest, context: Any) -> pb.ListKeysResponse:
        records = await self._keys.list(current_caller().user_id)
        return pb.ListKeysResponse(keys=[key_pb(record) for record in records])

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Any) -> pb.RevokeKeyResponse:
        key_id = _key_id(request.key_id, "key_id")
        revoked = await self._keys.revoke(current_caller().user_id, key_id)
        return pb.RevokeKeyResponse(key=key_pb(revoked[0]))


class AdminKeyMethods:
    """AdminService.ListUserKeys, RevokeUserKeys: any user's keys, for admins."""

    _keys: ApiKeys

    async def ListUserKeys(self, request: pb.ListUserKeysRequest, context: Any) -> pb.ListKeysResponse:
        _require_admin()
        records = await self._keys.list(_user_id(request.user_id))
        return pb.ListKeysResponse(keys=[key_pb(record) for record in records])

    async def RevokeUserKeys(
        self, request: pb.RevokeUserKeysRequest, context: Any
    ) -> pb.RevokeUserKeysResponse:
        _require_admin()
        user_id = _user_id(request.user_id)
        key_id = _key_id(request.key_id, "key_id") if request.key_id else None
        before = {record.id for record in await self._keys.list(user_id) if record.revoked_at is None}
        revoked = await self._keys.revoke(user_id, key_id)
        return pb.RevokeUserKeysResponse(revoked=sum(1 for record in revoked if record.id in before))


def _require_admin() -> None:
    if not current_caller().admin:
        raise PermissionDenied(
            "only admins may do this (a token with the admin role, or a user in CHATMESH_CHAT_ADMIN_USERS)"
        )
