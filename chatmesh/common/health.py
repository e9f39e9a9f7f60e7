"""gRPC health that means something: SERVING only while the dependencies a service needs answer.

Load balancers (Envoy's active gRPC health checks, Kubernetes readiness probes) read the standard
`grpc.health.v1.Health` status; a service whose database or engine is unreachable would otherwise
report SERVING and take requests it can only fail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from grpc_health.v1 import health, health_pb2

from chatmesh.common.tracing import untraced

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[object]]
"""Returns (anything) when the dependency answers; raises when it does not."""


class DependencyHealth:
    """Checks every dependency each `interval_s` (each within `timeout_s`) and reports the server and
    `service_names` SERVING while all answer, NOT_SERVING while any does not. Changes are logged with
    the failing dependencies and their errors. A server in graceful shutdown stays NOT_SERVING (the
    health servicer ignores later changes)."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        checks: Mapping[str, Check],
        *,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._servicer = servicer
        self._service_names = list(service_names)
        self._checks = dict(checks)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._failing: dict[str, str] = {}

    async def check_once(self) -> dict[str, str]:
        """Run every check once (concurrently), update the reported status; returns the failures."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(self._checks[name]) for name in names))
        failing = {name: error for name, error in zip(names, results, strict=True) if error is not None}
        if failing != self._failing:
            if failing:
                log.warning("dependencies unreachable: reporting NOT_SERVING", extra={"failing": failing})
            else:
                log.info("dependencies reachable again: reporting SERVING", extra={"was": self._failing})
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if failing
                else health_pb2.HealthCheckResponse.SERVING
            )
            for name in ("", *self._service_names):
                await self._servicer.set(name, status)
        self._failing = failing
        return failing

    async def watch(self) -> None:
        """Check forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check_once()

    async def _run(self, check: Check) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                with untraced():
                    await check()
        except TimeoutError:
            return f"no answer within {self._timeout_s:g} s"
        except Exception as exc:  # any failure of a dependency is "unreachable", whatever its kind
            return f"{type(exc).__name__}: {exc}"
        return None
