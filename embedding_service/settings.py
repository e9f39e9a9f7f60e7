"""Typed settings of the embedding service, read from `CHATMESH_EMBEDDING_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from chatmesh.common.service_settings import EmbeddingServiceSettings


class EmbeddingSettings(EmbeddingServiceSettings):
    """Everything the embedding service can be configured with: the settings `chatmesh run` sets
    (`EmbeddingServiceSettings`, in the shared runtime), and these."""

    model_config = SettingsConfigDict(protected_namespaces=())

    model_path: Path | None = Field(
        default=None,
        description="sentence-transformers model directory; default: the bundled all-MiniLM-L6-v2",
    )
    # Vectors of different models must never be compared, so change the name whenever model_path changes.
    model_name: str = Field(default="all-MiniLM-L6-v2", description="model name reported to clients")

    # Micro-batching: concurrent Embed calls are merged into one forward pass of at most `max_batch_size`
    # texts. `max_wait_ms` is how long a request arriving at an idle encoder waits for companions; requests
    # arriving while the encoder is busy simply join the next batch. 0 by default: under load batches form
    # anyway while the encoder works (32 concurrent clients: 0.96 of in-process batch throughput at 0 ms,
    # 0.97 at 2 ms), and a lone request -- a cache lookup in front of a completion -- should not wait.
    max_batch_size: int = Field(default=64, ge=1)
    max_wait_ms: float = Field(default=0.0, ge=0)

    # Request limits, reported by GetModelInfo.
    max_texts_per_request: int = Field(default=64, ge=1)
    max_text_chars: int = Field(default=8192, ge=1)

    runtime: Literal["onnx", "torch"] = Field(
        default="onnx",
        description="onnx: ONNX Runtime (same vectors, ~4x less CPU per text); torch: sentence-transformers",
    )
    threads: int | None = Field(
        default=None, ge=1, description="encoder CPU threads; default: one per physical core"
    )

    # The vector index (VectorService): embedded Qdrant (local mode) in `vectors_path` by default, or a
    # Qdrant server at `vectors_url`. Local mode locks its directory: one embedding service per path.
    vectors_enabled: bool = Field(default=True, description="serve chatmesh.vectors.v1.VectorService")
    vectors_path: Path = Field(
        default=Path(".run/qdrant"), description="local-mode index directory (relative: to the working dir)"
    )
    vectors_url: str | None = Field(
        default=None, description="Qdrant server, e.g. http://127.0.0.1:6333; set: local mode is off"
    )
    vectors_api_key: SecretStr | None = Field(default=None, description="API key of the Qdrant server")
    vectors_timeout_s: float = Field(
        default=5.0, gt=0, description="longest a single index operation (search, upsert, delete) may take"
    )
    # Multitenancy: the payload key that says whose a point is (the semantic cache's `scope`). In local
    # mode each of its values gets a partition of its own, so a search or delete with an exact condition
    # on it scans that tenant's points only; on a server it gets a tenant payload index (`is_tenant`).
    vectors_tenant_key: str = Field(
        default="scope",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
        description="payload key that partitions the points by tenant (local mode) or is the tenant index",
    )
