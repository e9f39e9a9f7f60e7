"""Every service started on its own (`python -m <service>`, as a deployment or a developer runs it, not
under `chatmesh run`) keeps what it writes to its owner, whatever the umask of the shell it starts from:
the chat service's SQLite database and its -wal/-shm, the embedding service's local vector index, the
inference service's llama-server log (which may hold prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.files import loose_paths, umask
from tests.support.processes import free_port, run_service
from tests.support.services import MODEL_STARTUP_TIMEOUT_S, chat_env, embedding_env, standard_engine_env

pytestmark = pytest.mark.integration


def test_each_service_writes_files_for_its_owner_alone(tmp_path: Path) -> None:
    # Every directory below is the service's to create; a shell's usual umask (022) when they start.
    vectors, engine_run, database = tmp_path / "vectors", tmp_path / "engine", tmp_path / "db"
    inference, embedding, chat = (f"127.0.0.1:{free_port()}" for _ in range(3))
    with (
        umask(0o022),
        run_service(
            "inference_service",
            {**standard_engine_env(inference), "CHATMESH_INFERENCE_RUN_DIR": str(engine_run)},
            inference,
            MODEL_STARTUP_TIMEOUT_S,
        ),
        run_service(
            "embedding_service",
            embedding_env(embedding, vectors_path=vectors),
            embedding,
            MODEL_STARTUP_TIMEOUT_S,
        ),
        run_service(
            "chat_service", chat_env(chat, f"sqlite+aiosqlite:///{database / 'chat.db'}", inference), chat, 60
        ),
    ):
        assert any(path.name.startswith("llama-server") for path in engine_run.iterdir())
        assert (vectors / "meta.json").exists()
        assert {"chat.db", "chat.db-wal", "chat.db-shm"} <= {path.name for path in database.iterdir()}
        for root in (engine_run, vectors, database):
            assert not loose_paths(root), f"readable by others: {loose_paths(root)}"
