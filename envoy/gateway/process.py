"""Running Envoy: start it on a rendered config, wait until it is ready, read its admin interface, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from chatmesh.common.children import Child, NotReady, accepting, child_process
from chatmesh.common.loopback import is_loopback_host
from chatmesh.common.private_files import private_directory, write_private
from gateway.config import render_envoy_config
from gateway.settings import GatewaySettings, split_host_port
from gateway.validate import envoy_binary

# The admin interface is local: never send its requests through an HTTP proxy from the environment.
_ADMIN_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _admin_get(url: str, timeout_s: float) -> tuple[int, str]:
    try:
        with _ADMIN_OPENER.open(url, timeout=timeout_s) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:  # a status other than 2xx still has a body worth showing
        return exc.code, exc.read().decode(errors="replace")


@dataclass
class EnvoyProcess:
    """A running Envoy started by `run_envoy`."""

    child: Child
    config_path: Path
    listen_address: str
    admin_address: str
    bind_address: str = ""
    """host:port the public listener is bound to, as configured (`0.0.0.0:8080` for every interface)."""
    metrics_address: str | None = None

    @property
    def process(self) -> asyncio.subprocess.Process:
        """The Envoy process."""
        return self.child.process

    @property
    def log_path(self) -> Path:
        """Where Envoy logs (stdout and stderr)."""
        assert self.child.log_path is not None
        return self.child.log_path

    @property
    def base_url(self) -> str:
        """`http://host:port` of the public listener."""
        return f"http://{self.listen_address}"

    @property
    def loopback_only(self) -> bool:
        """Whether the public listener is reachable from this machine alone."""
        return is_loopback_host(self.bind_address.rpartition(":")[0])

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of Envoy's log, for error messages."""
        return self.child.log_tail(max_chars)

    async def admin_get(self, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """GET `path` (e.g. `/clusters`, `/stats?filter=...`) from the admin interface: (status, body).

        Raises `OSError` (connection refused, ...) or `TimeoutError` when the admin does not answer."""
        # urllib blocks, so it runs in a thread; the admin answers in microseconds.
        return await asyncio.to_thread(_admin_get, f"http://{self.admin_address}{path}", timeout_s)

    async def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges whose names match `filter_regex`, by name."""
        query = f"?usedonly&filter={urllib.parse.quote(filter_regex)}" if filter_regex else "?usedonly"
        status, body = await self.admin_get(f"/stats{query}")
        if status != 200:
            raise RuntimeError(f"admin /stats answered {status}: {body[:200]}")
        result: dict[str, int] = {}
        for line in body.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                result[name] = int(value)
        return result


def _connectable_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host


async def _ready(envoy: EnvoyProcess) -> bool:
    """Whether the admin interface reports LIVE (once initialised, which includes the first health-check
    round of every replica) and the public listener accepts connections."""
    status, body = await envoy.admin_get("/ready", timeout_s=1.0)
    if status != 200 or body.strip() != "LIVE":
        raise NotReady(f"/ready: {status} {body.strip()}")
    return await accepting(*split_host_port(envoy.listen_address))


def _write_config(path: Path, text: str) -> None:
    # The config holds the JWT secret (HS256): the owner's alone, like the log beside it.
    private_directory(path.parent)
    write_private(path, text)


@contextlib.asynccontextmanager
async def run_envoy(
    settings: GatewaySettings,
    workdir: Path,
    descriptor_path: Path | None = None,
    ready_timeout_s: float = 30.0,
) -> AsyncIterator[EnvoyProcess]:
    """Write the config into `workdir`, run Envoy until the block ends, yield it once it is ready.

    Ready means the admin interface reports LIVE (Envoy has initialised, including the first health
    check of each replica) and the public listener accepts connections. On exit Envoy gets SIGTERM
    (SIGKILL after 10 s). Raises `ChildFailed` (a `RuntimeError`) with the log's tail if Envoy exits
    while starting or is not ready within `ready_timeout_s`.
    """
    config_path = workdir / "envoy.json"
    log_path = workdir / "envoy.log"
    await asyncio.to_thread(_write_config, config_path, render_envoy_config(settings, descriptor_path))
    args = [
        str(envoy_binary(settings)),
        "-c",
        str(config_path),
        "--log-level",
        settings.log_level,
        # Hot restart shares memory between Envoys on one machine; several gateways (tests) must not.
        "--disable-hot-restart",
    ]
    if settings.concurrency is not None:
        args += ["--concurrency", str(settings.concurrency)]
    async with child_process("envoy", args, grace_s=10.0, log_path=log_path) as child:
        envoy = EnvoyProcess(
            child=child,
            config_path=config_path,
            listen_address=f"{_connectable_host(settings.listen_host)}:{settings.listen_port}",
            admin_address=f"{_connectable_host(settings.admin_host)}:{settings.admin_port}",
            bind_address=f"{settings.listen_host}:{settings.listen_port}",
            metrics_address=None
            if settings.metrics_port is None
            else f"{_connectable_host(settings.metrics_host)}:{settings.metrics_port}",
        )
        await child.wait_ready(
            lambda: _ready(envoy), f"/ready LIVE and connections on {envoy.listen_address}", ready_timeout_s
        )
        yield envoy


async def serve(settings: GatewaySettings, workdir: Path) -> None:
    """Run the gateway until SIGTERM/SIGINT; `RuntimeError` if Envoy exits by itself."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_envoy(settings, workdir) as envoy:
        metrics = (
            f", metrics http://{envoy.metrics_address}/stats/prometheus" if envoy.metrics_address else ""
        )
        print(
            f"gateway ready, listening on {envoy.bind_address} ({envoy.base_url}); admin"
            f" {envoy.admin_address} (loopback){metrics}; log: {envoy.log_path}"
        )
        exited = asyncio.ensure_future(envoy.process.wait())
        waiting = asyncio.ensure_future(stop.wait())
        await asyncio.wait([exited, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if exited.done():
            raise RuntimeError(f"envoy exited with code {exited.result()}:\n{envoy.log_tail()}")
