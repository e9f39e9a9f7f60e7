"""Qdrant local mode's machinery for `embedding_service.qdrant_index`: where the client's calls run (a
dedicated thread and loop in local mode, the caller's loop for a server), and opening a local index with
its SQLite storage switched to write-ahead logging. See `qdrant_index`'s docstring for why."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

from qdrant_client import AsyncQdrantClient
from qdrant_client.local.persistence import STORAGE_FILE_NAME

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Runner(Protocol):
    """Where the client's coroutines run."""

    async def run(self, call: Coroutine[Any, Any, _T]) -> _T: ...

    def close(self) -> None: ...


class CallerLoop:
    """On the caller's event loop: for a client that really awaits I/O (a Qdrant server)."""

    async def run(self, call: Coroutine[Any, Any, _T]) -> _T:
        return await call

    def close(self) -> None:
        pass


class DedicatedLoop:
    """On an event loop of its own, in one thread: for local mode, whose coroutines never yield.

    One thread serialises the calls, which local mode needs, and keeps its CPU-bound scans off the
    service's loop (they still share the GIL, but gRPC and the encoder's torch threads keep running)."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, call: Coroutine[Any, Any, _T]) -> _T:
        # A caller that gives up cancels the call if it has not started; one that started finishes
        # (local mode cannot be interrupted) and its result is dropped.
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self._loop))

    def close(self) -> None:
        """Stop the loop and join its thread (blocks until the call in progress, if any, ends)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def use_write_ahead_log(root: Path, name: str) -> None:
    """Switch the SQLite file of local collection `name` to write-ahead logging, if it can.

    Local mode commits each point on its own. In SQLite's default rollback-journal mode a commit
    creates, syncs and deletes a journal besides syncing the database (2-8 ms here); with a
    write-ahead log it appends and syncs once (about 0.4 ms), equally durable (local mode keeps the
    default synchronous=FULL). The mode is stored in the database file, so the client's own connection
    follows it and it outlasts restarts. qdrant-client has no setting for it: the file is found by
    its persistence module's layout, and if that moves, inserts are merely slower."""
    database = root / "collection" / name / STORAGE_FILE_NAME
    if not database.is_file():
        log.warning("local collection storage not found; writes stay slow", extra={"path": str(database)})
        return
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=1.0)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        log.warning(
            "could not switch local collection storage to write-ahead logging; writes stay slow",
            extra={"path": str(database), "error": str(exc)},
        )


async def open_local(path: Path) -> AsyncQdrantClient:
    """Open local mode at `path`, creating it if missing (on the index's own thread: loading a large
    index takes a while)."""
    try:
        client = AsyncQdrantClient(path=str(path))
    except RuntimeError as exc:
        # qdrant-client's words ("already accessed by another instance") do not say what to do here.
        raise RuntimeError(
            f"the vector index at {path} is in use by another process (local mode locks its directory):"
            " stop that process, point CHATMESH_EMBEDDING_VECTORS_PATH elsewhere, or use a Qdrant"
            " server with CHATMESH_EMBEDDING_VECTORS_URL"
        ) from exc
    # Collections made before writes used a write-ahead log (or by another program) switch now.
    for described in (await client.get_collections()).collections:
        use_write_ahead_log(path, described.name)
    return client
