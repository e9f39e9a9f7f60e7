"""A NATS server with JetStream of the tests' own, on a free port with a fresh store, so job tests never
share state with the machine's NATS (or each other) and can kill and restart it."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chatmesh.common.nats_server import nats_server_args
from tests.support.processes import LoggedProcess, free_port, start_process, stop_process


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
    deadline = time.monotonic() + timeout
    while not (_accepts(port) and "Server is ready" in process.output()):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"nats-server did not start on port {port}:\n{process.output_tail()}")
        time.sleep(0.05)
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
