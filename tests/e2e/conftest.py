"""The end-to-end tier's shared engine: one inference service serving two catalog models, for every module
that drives the mesh with more than one model (the page, the OpenAI API, the chat API's models).

Started once per session, on first use: loading two models costs seconds, and each module's stack (chat
replicas, Envoy) is cheap next to it. Shared: do not kill it or rely on its state.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.stack import inference_service

DEFAULT_MODEL = "gemma-3-270m"
"""The two-model engine's default: the first it serves, what a chat that names no model gets."""

SECOND_MODEL = "smollm2-135m-instruct"
"""The other model it serves (an instruct model with its own ChatML template)."""

TWO_MODELS_CONTEXT = 2048
"""Its context: room for replies as long as under `make run` (the page's test stops one mid-way)."""


@pytest.fixture(scope="session")
def two_models_address() -> Iterator[str]:
    """Address of the session's two-model inference service: `DEFAULT_MODEL` (the default) and
    `SECOND_MODEL`, each on its own engine with the service's default reply length."""
    with inference_service(
        standard=False, context_length=TWO_MODELS_CONTEXT, models=f"{DEFAULT_MODEL},{SECOND_MODEL}"
    ) as engine:
        yield engine.address
    assert engine.process.returncode == 0, "SIGTERM should shut the inference service down cleanly"
