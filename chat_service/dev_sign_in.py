"""gRPC servicer of chatmesh.dev.v1.DevSignInService: a token for any user name, for the web page of a
mesh started by `make run`. The chat service registers it only when its settings allow (the dev secret,
`CHATMESH_CHAT_DEV_SIGN_IN=true`); see `ChatSettings`."""

from __future__ import annotations

import re
from typing import Any

from chatmesh.common.auth import JwtKeys, issue_token
from chatmesh.common.errors import InvalidArgument
from chatmesh.dev.v1 import dev_pb2 as pb
from chatmesh.dev.v1 import dev_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DevSignInService"].full_name

_USER = re.compile(r"[A-Za-z0-9._-]{1,64}")


class DevSignInServicer(dev_pb2_grpc.DevSignInServiceServicer):
    """Signs tokens with the mesh's dev secret; no password, so never part of a deployment."""

    def __init__(self, keys: JwtKeys, ttl_s: int = 12 * 3600) -> None:
        self._keys = keys
        self._ttl_s = ttl_s

    async def SignIn(self, request: pb.SignInRequest, context: Any) -> pb.SignInResponse:
        user = request.user.strip()
        if not _USER.fullmatch(user):
            raise InvalidArgument("user", "must be 1 to 64 letters, digits, '.', '_' or '-'")
        return pb.SignInResponse(
            token=issue_token(self._keys, user, self._ttl_s), user=user, expires_in_s=self._ttl_s
        )
