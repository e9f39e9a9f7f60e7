"""The API-key methods of AccountService and AdminService (protobuf in, protobuf out)."""

from __future__ import annotations


class KeyMethods:
    """AccountService.CreateKey, ListKeys, RevokeKey: the caller's own keys."""


class AdminKeyMethods:
    """AdminService.ListUserKeys, RevokeUserKeys: any user's keys, for admins."""
