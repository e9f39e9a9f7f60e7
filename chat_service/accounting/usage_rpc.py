"""The usage and budget methods of AccountService and AdminService (protobuf in, protobuf out)."""

from __future__ import annotations


class UsageMethods:
    """AccountService.GetUsage: the caller's usage and budgets."""


class AdminUsageMethods:
    """AdminService.GetTeamUsage, ListBudgets, SetBudget: the team's usage and budgets, for admins."""
