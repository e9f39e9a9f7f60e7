"""Accounting: who may use how much. Usage records (one per generation), budgets per user and group and
day and month (checked before a generation starts, across replicas), API keys (hashed, revocable), and
the caller's identity as the replicas see it.

- `values`: the domain values (`Caller`, `UsageEntry`, `BudgetLimit`, `ApiKeyRecord`, ...).
- `store`: the `AccountStore` protocol (SQL implementation: `chat_service.storage.sql.accounts`).
"""
