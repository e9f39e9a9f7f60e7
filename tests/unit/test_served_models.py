"""The served-models setting (`CHATMESH_INFERENCE_MODELS`, the mesh's `CHATMESH_MESH_MODELS`): catalog
names and NAME=PATH entries, in order, and errors that name the variable and the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatmesh.models.catalog import CATALOG, DEFAULT_MODEL, catalog_model
from chatmesh.models.served import ServedModel, ServedModelsError, parse_served_models


def test_catalog_names_and_local_files_in_order() -> None:
    served = parse_served_models(
        " qwen2.5-coder-0.5b-instruct , mine=/models/mine.gguf,smollm2-135m-instruct, home=~/x.gguf "
    )
    assert served == [
        ServedModel("qwen2.5-coder-0.5b-instruct", catalog=CATALOG["qwen2.5-coder-0.5b-instruct"]),
        ServedModel("mine", path=Path("/models/mine.gguf")),
        ServedModel("smollm2-135m-instruct", catalog=CATALOG["smollm2-135m-instruct"]),
        ServedModel("home", path=Path.home() / "x.gguf"),
    ]


def test_a_local_file_may_take_a_catalog_name() -> None:
    # Serving one's own copy under the catalog's name: the path wins, no pull.
    [served] = parse_served_models("gemma-3-270m=/data/gemma.gguf")
    assert served == ServedModel("gemma-3-270m", path=Path("/data/gemma.gguf"))


@pytest.mark.parametrize("spec", ["", " ", ",", " , ,"])
def test_an_empty_setting_names_no_model(spec: str) -> None:
    assert parse_served_models(spec) == []


def test_an_unknown_name_names_the_variable_and_the_catalog() -> None:
    with pytest.raises(ServedModelsError) as raised:
        parse_served_models("smollm2-135m-instruct,llama-70b", "CHATMESH_MESH_MODELS")
    message = str(raised.value)
    assert message.startswith("CHATMESH_MESH_MODELS: 'llama-70b' is not a catalog model")
    assert all(name in message for name in CATALOG) and "NAME=PATH" in message


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("bad name=/x.gguf", "'bad name' is not a model name"),
        ("-dash=/x.gguf", "'-dash' is not a model name"),
        (f"{'a' * 101}=/x.gguf", "at most 100 characters"),
        ("mine=", "'mine=' names no file after '='"),
        ("mine= ", "names no file after '='"),
        ("=/x.gguf", "'' is not a model name"),
        ("gemma-3-270m,gemma-3-270m", "gemma-3-270m named more than once"),
        ("a=/x.gguf,b=/y.gguf,a=/z.gguf", "a named more than once"),
    ],
)
def test_malformed_entries_are_refused(spec: str, said: str) -> None:
    with pytest.raises(ServedModelsError, match="CHATMESH_INFERENCE_MODELS: ") as raised:
        parse_served_models(spec)
    assert said in str(raised.value)


def test_the_default_model_is_in_the_catalog() -> None:
    assert catalog_model(DEFAULT_MODEL).name == DEFAULT_MODEL
    with pytest.raises(KeyError) as raised:
        catalog_model("nope")
    assert "`chatmesh models list`" in str(raised.value)
