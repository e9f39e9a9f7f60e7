"""Typed settings of the embedding service, read from `CHATMESH_EMBEDDING_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from chatmesh.common.settings import ServiceSettings


class EmbeddingSettings(ServiceSettings):
    """Everything the embedding service can be configured with."""

    model_config = SettingsConfigDict(env_prefix="CHATMESH_EMBEDDING_", protected_namespaces=())

    address: str = "127.0.0.1:50053"
    model_path: Path | None = Field(
        default=None,
        description="sentence-transformers model directory; default: the bundled all-MiniLM-L6-v2",
    )
    # Vectors of different models must never be compared, so change the name whenever model_path changes.
    model_name: str = Field(default="all-MiniLM-L6-v2", description="model name reported to clients")

    # Micro-batching: concurrent Embed calls are merged into one forward pass of at most `max_batch_size`
    # texts. `max_wait_ms` is how long a request arriving at an idle encoder waits for companions; requests
    # arriving while the encoder is busy simply join the next batch.
    max_batch_size: int = Field(default=64, ge=1)
    max_wait_ms: float = Field(default=2.0, ge=0)

    # Request limits, reported by GetModelInfo.
    max_texts_per_request: int = Field(default=64, ge=1)
    max_text_chars: int = Field(default=8192, ge=1)

    threads: int | None = Field(
        default=None, ge=1, description="torch CPU threads; default: one per physical core"
    )
