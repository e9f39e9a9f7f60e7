"""How the SDK retries a failed call: the policy, and the pieces its retry loop shares with the server's
in-band errors."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from chatmesh.common.errors import ChatmeshError

# Statuses after which the same request may succeed and cannot have been applied twice: the request
# either never reached a replica, or carries a request_id the service deduplicates on.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed calls are retried: up to `max_attempts` attempts in all (1 turns retries off),
    waiting `initial_backoff_s * multiplier**n` (capped at `max_backoff_s`, with jitter) in between,
    or the server's hint when it gives one (RESOURCE_EXHAUSTED's `retry_after_s`)."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoff_s(self, retry: int, error: ChatmeshError) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry) after `error`."""
        hint = getattr(error, "retry_after_s", None)
        if isinstance(hint, int | float) and hint > 0:
            return min(float(hint), self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        # Full jitter, so clients that failed together do not come back together.
        return random.uniform(ceiling / 2, ceiling)


DEFAULT_RETRY = RetryPolicy()
"""The policy a client uses unless given another."""

NO_RETRY = RetryPolicy(max_attempts=1)
"""A policy that makes every call exactly once."""


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def synthetic_rpc_error(code_name: str, message: str) -> grpc.aio.AioRpcError:
    """An AioRpcError for a failure the server reported in-band, so that one mapper (`error_from_rpc`)
    and one retry rule handle it exactly like a failed status."""
    code = grpc.StatusCode.__members__.get(code_name, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)
