"""Which models the inference service serves, how each is prompted, where its file comes from, and how
many llama.cpp threads each engine gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from chatmesh.models.catalog import CATALOG, DEFAULT_MODEL, GEMMA3_270M, SMOLLM2_135M
from chatmesh.models.served import ServedModel
from chatmesh.models.store import ModelFileError, ModelStore
from inference_service.engines import engine_threads, model_setup
from inference_service.model_files import bundled_gguf_path, catalog_model_file
from inference_service.prompt import FEW_SHOT_PREAMBLE, TEMPLATES
from inference_service.settings import InferenceSettings


def test_the_models_setting_comes_first_then_gguf_path_then_the_catalogs_default(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    assert InferenceSettings(models=f"{SMOLLM2_135M.name},local={gguf}").served_models() == [
        ServedModel(SMOLLM2_135M.name, catalog=SMOLLM2_135M),
        ServedModel("local", path=gguf),
    ]
    assert InferenceSettings(gguf_path=gguf, model_name="mine").served_models() == [
        ServedModel("mine", path=gguf)
    ]
    assert InferenceSettings().served_models() == [ServedModel(DEFAULT_MODEL, catalog=CATALOG[DEFAULT_MODEL])]


def test_bad_models_settings_are_refused_when_read() -> None:
    with pytest.raises(ValidationError, match="CHATMESH_INFERENCE_MODELS"):
        InferenceSettings(models="no-such-model")
    with pytest.raises(ValidationError, match="the triton backend serves one"):
        InferenceSettings(backend="triton", models=f"{GEMMA3_270M.name},{SMOLLM2_135M.name}")


@pytest.mark.parametrize(
    ("cores", "models", "expected"),
    [(2, 1, (1, 2)), (2, 2, (1, 1)), (2, 3, (1, 1)), (8, 1, (7, 8)), (8, 2, (3, 4)), (8, 3, (2, 2))],
)
def test_the_cores_are_divided_among_the_engines(
    monkeypatch: pytest.MonkeyPatch, cores: int, models: int, expected: tuple[int, int]
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert engine_threads(InferenceSettings(), models) == expected
    assert engine_threads(InferenceSettings(threads=4, batch_threads=5), models) == (4, 5)


def test_a_transcript_catalog_model_gets_the_transcript_after_the_preamble_setting() -> None:
    gemma = ServedModel(GEMMA3_270M.name, catalog=GEMMA3_270M)
    store = ModelStore()
    few_shot = model_setup(gemma, InferenceSettings(prompt_preamble="few-shot"), store)
    assert few_shot.template.user == TEMPLATES["transcript"].user
    assert few_shot.template.preamble == FEW_SHOT_PREAMBLE
    assert model_setup(gemma, InferenceSettings(prompt_preamble="none"), store).template.preamble == ""
    # Set explicitly, the prompt template applies to catalog models too.
    forced = model_setup(gemma, InferenceSettings(prompt_template="gemma"), store)
    assert forced.template.user == TEMPLATES["gemma"].user


def test_a_local_model_that_is_not_a_file_is_a_model_file_error(tmp_path: Path) -> None:
    missing = ServedModel("mine", path=tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError, match=f"model 'mine': {tmp_path / 'missing.gguf'} is not a file"):
        model_setup(missing, InferenceSettings(), ModelStore(tmp_path))


def test_gemma_is_served_from_the_bundled_file_unless_pulled_and_a_damaged_pull_is_never_replaced(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path)
    assert catalog_model_file(GEMMA3_270M, store) == bundled_gguf_path()
    damaged = store.path(GEMMA3_270M)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"GGUF")
    with pytest.raises(ModelFileError, match="partial or damaged"):
        catalog_model_file(GEMMA3_270M, store)
    # Only Gemma ships in the venv: another model that was never pulled says how to pull it.
    with pytest.raises(ModelFileError, match=f"chatmesh models pull {SMOLLM2_135M.name}"):
        catalog_model_file(SMOLLM2_135M, store)
