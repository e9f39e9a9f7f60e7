"""gRPC servicers of chatmesh.chat.v1.AccountService and AdminService, composed of the key methods
(`keys_rpc`) and the usage and budget methods (`usage_rpc`), which share the use cases they are given."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chat_service.accounting.keys_rpc import AdminKeyMethods, KeyMethods
from chat_service.accounting.usage_rpc import AdminUsageMethods, UsageMethods
from chatmesh.chat.v1 import account_pb2_grpc

if TYPE_CHECKING:
    from chat_service.accounting.keys import ApiKeys
    from chat_service.accounting.ledger import Ledger


class _Accounts:
    """What both servicers hold: the API keys, and the ledger (None with accounting off: no usage is
    recorded, so there is none to report, and budgets are not enforced)."""

    def __init__(self, keys: ApiKeys, ledger: Ledger | None) -> None:
        self._keys = keys
        self._ledger = ledger


class AccountServicer(_Accounts, KeyMethods, UsageMethods, account_pb2_grpc.AccountServiceServicer):
    """A caller's own keys, usage and budgets."""


class AdminServicer(_Accounts, AdminKeyMethods, AdminUsageMethods, account_pb2_grpc.AdminServiceServicer):
    """The team's usage, budgets and keys; every method checks that the caller is an admin."""
