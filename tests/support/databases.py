"""Throw-away databases for tests: a fresh PostgreSQL database, or a SQLite file."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.support.processes import free_port

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.asynccontextmanager
async def fresh_postgres_database(prefix: str = "chatmesh_test") -> AsyncIterator[str]:
    """Create a uniquely named database on the local server; yield its SQLAlchemy URL; drop it after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


POSTGRES_BIN = Path("/usr/lib/postgresql")


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of the test's own (a fresh cluster on a free port), so a test can stop and
    restart it without touching the machine's server that other tests use."""

    data_dir: Path
    socket_dir: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        subprocess.run(_as_postgres(command), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(self.data_dir.parent / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run the command as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """initdb a fresh cluster (trust auth, no fsync) and run it until the block ends, then delete it.

    Its directory is a new one under the system temp dir, not pytest's: the `postgres` user cannot
    enter root's private pytest directories."""
    versions = sorted(POSTGRES_BIN.glob("*/bin/initdb"))
    if not versions:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    bin_dir = versions[-1].parent
    directory = Path(tempfile.mkdtemp(prefix="chatmesh-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
    data_dir = directory / "data"
    subprocess.run(
        _as_postgres(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", "postgres", "--no-sync"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = PrivatePostgres(data_dir, directory, free_port(), bin_dir)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
