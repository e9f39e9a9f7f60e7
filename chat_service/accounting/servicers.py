"""gRPC servicers of chatmesh.chat.v1.AccountService and AdminService, composed of the key methods
(`keys_rpc`) and the usage and budget methods (`usage_rpc`), which share the use cases they are given."""

from __future__ import annotations

from chat_service.accounting.keys_rpc import AdminKeyMethods, KeyMethods
from chat_service.accounting.usage_rpc import AdminUsageMethods, UsageMethods
from chatmesh.chat.v1 import account_pb2_grpc


class AccountServicer(KeyMethods, UsageMethods, account_pb2_grpc.AccountServiceServicer):
    """A caller's own keys, usage and budgets."""


class AdminServicer(AdminKeyMethods, AdminUsageMethods, account_pb2_grpc.AdminServiceServicer):
    """The team's usage, budgets and keys; every method checks that the caller is an admin."""
