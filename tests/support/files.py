"""Checks on the files a process writes: who may read them."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """This process's umask (and its children's) set to `mask` for the block."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def loose_paths(root: Path) -> list[str]:
    """Paths under `root` (itself included) that anyone but their owner may read or enter, each with its
    mode, relative to `root`'s parent."""
    return [
        f"{path.relative_to(root.parent)} {stat.filemode(path.stat().st_mode)}"
        for path in [root, *root.rglob("*")]
        if not path.is_symlink() and path.stat().st_mode & 0o077
    ]
