"""Which models `chatmesh run` serves and pulls: its `CHATMESH_MESH_MODELS` (the default model first),
passed to the inference service unless the user set the service's own model settings, which win."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatmesh.common.service_settings import InferenceServiceSettings
from chatmesh.common.settings import env_name
from chatmesh.mesh import GGUF_PATH_VARIABLE, MeshSettings, mesh_models, plan, pull_missing_models, run
from chatmesh.models.catalog import CATALOG, DEFAULT_MODEL, CatalogModel
from chatmesh.models.pull import Downloader
from chatmesh.models.store import ModelStore

INFERENCE_MODELS = env_name(InferenceServiceSettings, "models")


@pytest.fixture(autouse=True)
def no_model_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from a user who set none of the model settings."""
    for variable in (INFERENCE_MODELS, GGUF_PATH_VARIABLE, env_name(MeshSettings, "models")):
        monkeypatch.delenv(variable, raising=False)


def inference_env(settings: MeshSettings) -> dict[str, str]:
    [inference] = [spec for spec in plan(settings) if spec.name == "inference"]
    return inference.env


def test_the_mesh_serves_the_default_model_first_and_passes_its_list_on() -> None:
    settings = MeshSettings()
    names = settings.models.split(",")
    assert names[0] == DEFAULT_MODEL
    assert set(names) == {"qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"}
    assert inference_env(settings)[INFERENCE_MODELS] == settings.models
    models = mesh_models(settings)
    assert models.from_mesh and models.variable == "CHATMESH_MESH_MODELS"
    assert [model.name for model in models.served] == names


def test_the_mesh_models_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMESH_MESH_MODELS", "gemma-3-270m,mine=/data/mine.gguf")
    assert inference_env(MeshSettings())[INFERENCE_MODELS] == "gemma-3-270m,mine=/data/mine.gguf"


def test_the_users_own_inference_models_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INFERENCE_MODELS, "smollm2-135m-instruct")
    settings = MeshSettings(models="gemma-3-270m")
    # Not rendered: the service reads the user's variable from the environment it inherits.
    assert INFERENCE_MODELS not in inference_env(settings)
    models = mesh_models(settings)
    assert not models.from_mesh and models.variable == INFERENCE_MODELS
    assert [model.name for model in models.served] == ["smollm2-135m-instruct"]


def test_a_users_single_gguf_file_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GGUF_PATH_VARIABLE, "/data/mine.gguf")
    assert INFERENCE_MODELS not in inference_env(MeshSettings())
    models = mesh_models(MeshSettings())
    assert models.variable == GGUF_PATH_VARIABLE and models.served == []


class RecordingStore(ModelStore):
    """A store whose pulls are only recorded."""

    def __init__(self, cache_dir: Path, pulled: set[str]) -> None:
        super().__init__(cache_dir)
        self.pulled = pulled
        self.pulls: list[str] = []

    def is_pulled(self, model: CatalogModel) -> bool:
        return model.name in self.pulled

    def pull(self, model: CatalogModel, progress: bool = True, download: Downloader | None = None) -> Path:
        self.pulls.append(model.name)
        return self.path(model)


def test_the_launcher_pulls_only_catalog_models_not_pulled_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = MeshSettings(
        models="qwen2.5-coder-0.5b-instruct,mine=/data/mine.gguf,gemma-3-270m,smollm2-135m-instruct"
    )
    store = RecordingStore(tmp_path, pulled={"smollm2-135m-instruct"})
    pull_missing_models(mesh_models(settings), store)
    assert store.pulls == ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]
    said = capsys.readouterr().out
    assert f"pulling qwen2.5-coder-0.5b-instruct into {tmp_path} (once)" in said


async def test_a_bad_models_setting_stops_the_mesh_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert await run(MeshSettings(models="smollm2-135m-instruct,nope")) == 1
    said = capsys.readouterr()
    assert "CHATMESH_MESH_MODELS: 'nope' is not a catalog model" in said.err
    assert all(name in said.err for name in CATALOG)
    assert "starting the mesh" not in said.out and not (tmp_path / ".run").exists()
