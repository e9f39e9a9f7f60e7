"""docs/models.md's catalog table says what the catalog says (a drift check)."""

from __future__ import annotations

from pathlib import Path

from chatmesh.models.catalog import CATALOG, DEFAULT_MODEL

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_every_catalog_model_has_its_row_with_the_catalogs_figures() -> None:
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in DOC.read_text().splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == set(CATALOG)
    for model in CATALOG.values():
        row = rows[model.name]
        for fact in (model.file_name, f"{model.size:,}", model.sha256, model.licence, model.prompt_format):
            assert fact in row, f"{model.name}: {fact!r} not in its row"
        assert f"`{model.parts[0].package}`" in row and f"`{model.parts[-1].package}`" in row
        assert f"({model.parts[0].version})" in row
        for stop in model.stop:
            assert stop.replace("\n", "\\n").replace("|", "\\|") in row, f"{model.name}: stop {stop!r}"


def test_the_default_model_is_named_as_such() -> None:
    assert f"**{DEFAULT_MODEL}** (the default)" in DOC.read_text()
