"""Every service started on its own (`python -m <service>`, as a deployment or a developer runs it, not
under `chatmesh run`) keeps what it writes to its owner, whatever the umask of the shell it starts from:
the chat service's SQLite database and its -wal/-shm, the embedding service's local vector index, the
inference service's llama-server log (which may hold prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.files import loose_paths, umask
from tests.support.stack import chat_service, embedding_service, inference_service

pytestmark = pytest.mark.integration


def test_each_service_writes_files_for_its_owner_alone(tmp_path: Path) -> None:
    # Every directory below is the service's to create; a shell's usual umask (022) when they start.
    vectors, engine_run, database = tmp_path / "vectors", tmp_path / "engine", tmp_path / "db"
    with (
        umask(0o022),
        inference_service(run_dir=engine_run) as inference,
        embedding_service(vectors_path=vectors),
        chat_service(f"sqlite+aiosqlite:///{database / 'chat.db'}", inference.address),
    ):
        assert any(path.name.startswith("llama-server") for path in engine_run.iterdir())
        assert (vectors / "meta.json").exists()
        assert {"chat.db", "chat.db-wal", "chat.db-shm"} <= {path.name for path in database.iterdir()}
        for root in (engine_run, vectors, database):
            assert not loose_paths(root), f"readable by others: {loose_paths(root)}"
