"""Fixtures shared by every test module.

The model-loading services start once per test session and are shared by the modules that can share
them: loading a model costs seconds, and a module's own copy would load it again. A test that needs
different engine settings (a tiny context, a queue of one) or that kills its service starts its own
with `tests.support.services` and `tests.support.processes.run_service`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from chatmesh.common.settings import env_name
from inference_service.settings import InferenceSettings
from tests.support.processes import LoggedProcess, free_port, run_service
from tests.support.services import MODEL_STARTUP_TIMEOUT_S
from tests.support.stack import embedding_env, standard_engine_env

# Every engine a test starts (they inherit this environment) prompts with the bare transcript, not the
# default few-shot preamble: the tests' token budgets (a 1,024-token context, prompts sized against it)
# and their long counting replies were built for it, and they test mechanics, not answers. The
# preamble's own tests set it explicitly (tests/integration/test_prompt_preamble.py).
os.environ.setdefault(env_name(InferenceSettings, "prompt_preamble"), "none")


@pytest.fixture(scope="session")
def inference_address() -> Iterator[str]:
    """Address of the session's inference service (the default llama-server backend, the bundled
    model, context `SHARED_ENGINE_CONTEXT`). Shared: do not kill it or rely on its state."""
    address = f"127.0.0.1:{free_port()}"
    with run_service(
        "inference_service", standard_engine_env(address), address, MODEL_STARTUP_TIMEOUT_S
    ) as process:
        yield address
    assert process.returncode == 0, "SIGTERM should shut the inference service down cleanly"


@pytest.fixture(scope="session")
def embedding_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LoggedProcess]]:
    """(address, process) of the session's embedding service, logging every request and batch at DEBUG,
    with the vector service on a fresh local index (tests keep apart by using their own collections)."""
    address = f"127.0.0.1:{free_port()}"
    env = embedding_env(address, vectors_path=tmp_path_factory.mktemp("qdrant"))
    with run_service("embedding_service", env, address, MODEL_STARTUP_TIMEOUT_S) as process:
        yield address, process
    assert process.returncode == 0, "SIGTERM should shut the embedding service down cleanly"
