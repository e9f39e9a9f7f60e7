"""The ONNX Runtime encoder gives the sentence-transformers encoder's vectors (the real MiniLM model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedding_service.encoder import (
    OnnxEncoder,
    SentenceTransformerEncoder,
    export_onnx,
    load_sentence_transformer,
    resolve_model_path,
)

pytestmark = pytest.mark.integration

TEXTS = [
    "What is the capital of France?",
    "how do i learn python quickly",
    "x",
    "A much longer question about the history of the Roman empire, " * 30,  # beyond max_seq_length
]


def test_onnx_vectors_are_the_torch_vectors(tmp_path: Path) -> None:
    model_path = resolve_model_path(None)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model_path, onnx_path)
    onnx = OnnxEncoder(onnx_path, model_path, "all-MiniLM-L6-v2", threads=1)
    torch = SentenceTransformerEncoder(load_sentence_transformer(model_path, None), "all-MiniLM-L6-v2")
    assert onnx.dimension == torch.dimension == 384
    together = onnx.encode(TEXTS)  # one padded batch
    one_by_one = np.vstack([onnx.encode([text]) for text in TEXTS])
    reference = torch.encode(TEXTS)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert (together * reference).sum(axis=1).min() > 0.9999
    assert (one_by_one * reference).sum(axis=1).min() > 0.9999
