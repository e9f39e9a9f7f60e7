"""The usage and budget methods of AccountService and AdminService (protobuf in, protobuf out)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from chat_service.accounting.identity import current_caller
from chat_service.accounting.ledger import MAX_REPORT_DAYS
from chat_service.accounting.values import BudgetLimit, BudgetPeriod, BudgetScope, BudgetStatus, UsageRow
from chatmesh.chat.v1 import account_pb2 as pb
from chatmesh.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied

if TYPE_CHECKING:
    from chat_service.accounting.ledger import Ledger

DEFAULT_REPORT_DAYS = 30

_SCOPES = {pb.BUDGET_SCOPE_USER: BudgetScope.USER, pb.BUDGET_SCOPE_GROUP: BudgetScope.GROUP}
_SCOPES_PB = {scope: value for value, scope in _SCOPES.items()}
_PERIODS = {pb.BUDGET_PERIOD_DAY: BudgetPeriod.DAY, pb.BUDGET_PERIOD_MONTH: BudgetPeriod.MONTH}
_PERIODS_PB = {period: value for value, period in _PERIODS.items()}


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def budget_pb(status: BudgetStatus) -> pb.Budget:
    limit = status.limit
    return pb.Budget(
        scope=_SCOPES_PB[limit.scope],
        subject=limit.subject,
        period=_PERIODS_PB[limit.period],
        limit_tokens=limit.tokens,
        used_tokens=status.used_tokens,
        remaining_tokens=status.remaining_tokens or 0,
        reset_time=_timestamp(status.reset_at),
        overridden=limit.overridden,
    )


def usage_pb(rows: Sequence[UsageRow]) -> list[pb.UsageRow]:
    return [
        pb.UsageRow(
            day=row.day.isoformat(),
            model=row.model,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cached_tokens=row.cached_tokens,
            requests=row.requests,
            user_id=row.user_id,
            group=row.group,
        )
        for row in rows
    ]


def _days(value: int) -> int:
    if value == 0:
        return DEFAULT_REPORT_DAYS
    if not 1 <= value <= MAX_REPORT_DAYS:
        raise InvalidArgument("days", f"must be 1 to {MAX_REPORT_DAYS} (0: {DEFAULT_REPORT_DAYS})")
    return value


def _ledger(ledger: Ledger | None) -> Ledger:
    if ledger is None:
        raise FailedPrecondition(
            "accounting is off in this deployment (CHATMESH_CHAT_ACCOUNTING=false): no usage is recorded"
        )
    return ledger


def _admin() -> None:
    if not current_caller().admin:
        raise PermissionDenied(
            "only admins see the team's usage and set budgets (a sign-in token with the admin role, or a"
            " user in CHATMESH_CHAT_ADMIN_USERS)"
        )


class UsageMethods:
    """AccountService.GetUsage: the caller's usage and budgets."""

    _ledger: Ledger | None

    async def GetUsage(self, request: pb.GetUsageRequest, context: Any) -> pb.GetUsageResponse:
        days = _days(request.days)
        caller = current_caller()
        ledger = _ledger(self._ledger)
        rows = await ledger.usage(caller.user_id, days)
        statuses = await ledger.statuses(caller.user_id)
        return pb.GetUsageResponse(
            usage=usage_pb(rows),
            budgets=[budget_pb(status) for status in statuses],
            user_id=caller.user_id,
            group=caller.group,
            admin=caller.admin,
        )


class AdminUsageMethods:
    """AdminService.GetTeamUsage, ListBudgets, SetBudget: the team's usage and budgets, for admins."""

    _ledger: Ledger | None

    async def GetTeamUsage(self, request: pb.GetTeamUsageRequest, context: Any) -> pb.GetTeamUsageResponse:
        _admin()
        days = _days(request.days)
        rows = await _ledger(self._ledger).team_usage(days, request.user_id or None, request.group or None)
        return pb.GetTeamUsageResponse(usage=usage_pb(rows))

    async def ListBudgets(self, request: pb.ListBudgetsRequest, context: Any) -> pb.ListBudgetsResponse:
        _admin()
        statuses = await _ledger(self._ledger).budgets()
        return pb.ListBudgetsResponse(budgets=[budget_pb(status) for status in statuses])

    async def SetBudget(self, request: pb.SetBudgetRequest, context: Any) -> pb.Budget:
        _admin()
        scope = _SCOPES.get(request.scope)
        if scope is None:
            raise InvalidArgument("scope", "must be BUDGET_SCOPE_USER or BUDGET_SCOPE_GROUP")
        period = _PERIODS.get(request.period)
        if period is None:
            raise InvalidArgument("period", "must be BUDGET_PERIOD_DAY or BUDGET_PERIOD_MONTH")
        subject = request.subject
        if not subject or len(subject) > 255 or subject == "*":
            raise InvalidArgument(
                "subject", "must be a user id or group name of 1 to 255 characters (defaults are settings)"
            )
        if request.limit_tokens < 0:
            raise InvalidArgument("limit_tokens", "must be 0 (no limit) or more")
        ledger = _ledger(self._ledger)
        if request.clear:
            return budget_pb(await ledger.clear_budget(scope, subject, period))
        limit = BudgetLimit(scope, subject, period, request.limit_tokens, overridden=True)
        return budget_pb(await ledger.set_budget(limit))
