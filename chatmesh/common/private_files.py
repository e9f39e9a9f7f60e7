"""Files that hold a secret or user data (the JWT secret, the rendered Envoy config with it, the SQLite
database, the vector index, the job streams, engine logs with prompts): readable by their owner alone.

Two layers: each entry point (`chatmesh run`, the gateway, every service's `__main__`) sets the process
umask to 077 with `keep_files_private`, so whatever it or a library or a child process (SQLite and its
-wal/-shm, Qdrant's local files, nats-server, llama-server, Envoy) creates afterwards is 0600 / 0700; and
the files chatmesh writes itself are created with explicit modes (`private_directory`, `write_private`,
`open_private`), so they are private whatever the umask of the process that calls them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, cast

PRIVATE_UMASK = 0o077
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def keep_files_private() -> int:
    """From now on, files and directories this process and its children create are its owner's alone.
    Returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def private_directory(path: Path) -> Path:
    """`path` as a directory (created, with its parents, if missing) that only its owner can enter; an
    existing one is tightened to 0700, which also shields whatever an earlier version left in it."""
    path.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    path.chmod(DIRECTORY_MODE)
    return path


def open_private(path: Path, mode: str = "wb") -> BinaryIO:
    """Open `path` for writing (`wb` truncates, `ab` appends) as a file of mode 0600, an existing file
    included."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    if mode not in ("wb", "ab"):
        raise ValueError(f"open_private writes binary files ('wb' or 'ab'), not {mode!r}")
    descriptor = os.open(path, flags, FILE_MODE)
    try:
        # O_CREAT's mode only applies to a new file (and the umask narrows it); an old one keeps its own.
        os.fchmod(descriptor, FILE_MODE)
        return cast(BinaryIO, os.fdopen(descriptor, mode))
    except BaseException:
        os.close(descriptor)
        raise


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` as a file of mode 0600 (replacing what it held)."""
    with open_private(path) as file:
        file.write(text.encode())
