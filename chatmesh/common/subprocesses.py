"""Stopping the child processes a launcher runs (services, Envoy, NATS): SIGTERM, a grace period for a
clean shutdown, then SIGKILL."""

from __future__ import annotations

import asyncio
import signal


async def wait_or_kill(process: asyncio.subprocess.Process, grace_s: float) -> None:
    """Wait up to `grace_s` for `process` to exit (it was asked to), then kill it."""
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        process.kill()
        await process.wait()


async def terminate(process: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM `process` if it still runs, and wait for it as `wait_or_kill` does."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    await wait_or_kill(process, grace_s)
