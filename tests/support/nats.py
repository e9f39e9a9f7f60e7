"""A NATS server with JetStream of the tests' own, on a free port with a fresh store, so job tests never
share state with the machine's NATS (or each other) and can kill and restart it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chatmesh.common.nats_server import nats_server_args
from tests.support.processes import LoggedProcess, fail_if_exited, free_port, start_process, stop_process
from tests.support.waiting import eventually_sync


@dataclass
class NatsServer:
    """A running test NATS server; `restart` keeps its port and its store (the streams survive)."""

    port: int
    store_dir: Path
    process: LoggedProcess

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)

    def start(self, timeout: float = 20.0) -> None:
        self.process = _start(self.port, self.store_dir, timeout)

    def restart(self) -> None:
        self.stop()
        self.start()


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _start(port: int, store_dir: Path, timeout: float) -> LoggedProcess:
    process = start_process(nats_server_args(port, store_dir))

    def ready() -> bool:
        fail_if_exited(process, f"before accepting connections on port {port}")
        return _accepts(port) and "Server is ready" in process.output()

    try:
        eventually_sync(ready, f"nats-server ready on port {port}", timeout, detail=process.output_tail)
    except BaseException:
        stop_process(process)
        raise
    return process


@contextlib.contextmanager
def run_nats(store_dir: Path) -> Iterator[NatsServer]:
    """A JetStream server until the block ends."""
    port = free_port()
    server = NatsServer(port, store_dir, _start(port, store_dir, 20.0))
    try:
        yield server
    finally:
        server.stop()
        server.process.remove_log()
