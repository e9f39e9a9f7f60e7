"""gRPC servicer of chatmesh.dev.v1.DevSignInService: a token for any user name, for the web page of a
mesh started by `make run`. The chat service registers it only when its settings allow (the dev secret,
`CHATMESH_CHAT_DEV_SIGN_IN=true`); see `ChatSettings`. It answers callers on this machine only."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Collection
from typing import Any

from chatmesh.common.auth import JwtKeys, issue_token
from chatmesh.common.errors import InvalidArgument, PermissionDenied
from chatmesh.common.loopback import PEER_ADDRESS_HEADER, is_loopback_host
from chatmesh.dev.v1 import dev_pb2 as pb
from chatmesh.dev.v1 import dev_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DevSignInService"].full_name

_USER = re.compile(r"[A-Za-z0-9._-]{1,64}")


def peer_host(peer: str) -> str | None:
    """The host of a grpc peer string (`ipv4:127.0.0.1:5000`, `ipv6:%5B::1%5D:5000`, `unix:...`)."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return "localhost"
    if kind in ("ipv4", "ipv6"):
        host = urllib.parse.unquote(rest).rpartition(":")[0]
        return host.strip("[]") or None
    return None


def is_local_caller(peer: str, metadata: Collection[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call comes from this machine: its connection is from loopback and, when the gateway
    forwarded it, the connection the gateway accepted was from loopback too (`PEER_ADDRESS_HEADER`, which
    the gateway overwrites: a client cannot choose it; X-Forwarded-For and the like count for nothing)."""
    host = peer_host(peer)
    if host is None or not is_loopback_host(host):
        return False
    for key, value in metadata or ():
        if key == PEER_ADDRESS_HEADER:
            forwarded = value.decode() if isinstance(value, bytes) else value
            if not is_loopback_host(forwarded):
                return False
    return True


class DevSignInServicer(dev_pb2_grpc.DevSignInServiceServicer):
    """Signs tokens with the mesh's dev secret; no password, so never part of a deployment, and only
    for callers on this machine (the gateway refuses others too, by the connection's address)."""

    def __init__(self, keys: JwtKeys, ttl_s: int = 12 * 3600) -> None:
        self._keys = keys
        self._ttl_s = ttl_s

    async def SignIn(self, request: pb.SignInRequest, context: Any) -> pb.SignInResponse:
        if not is_local_caller(context.peer(), context.invocation_metadata()):
            raise PermissionDenied(
                "the dev sign-in (a token for any user name, no password) answers callers on this"
                " machine only; sign in with a token from the mesh's operator or identity provider"
            )
        user = request.user.strip()
        if not _USER.fullmatch(user):
            raise InvalidArgument("user", "must be 1 to 64 letters, digits, '.', '_' or '-'")
        return pb.SignInResponse(
            token=issue_token(self._keys, user, self._ttl_s), user=user, expires_in_s=self._ttl_s
        )
