"""Which models a deployment serves: the `CHATMESH_INFERENCE_MODELS` setting, parsed.

The setting is a comma-separated list; each entry is a catalog model's name (`qwen2.5-coder-0.5b-instruct`)
or `NAME=PATH` for any local GGUF file served under NAME. The first entry is the default model (the one a
chat that names none gets). Shared by the inference service (which serves them) and the launcher (which
pulls the catalog ones before starting it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from chatmesh.models.catalog import CatalogModel, catalog_model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
"""A served model's name: what chats, the OpenAI API's `model` and metrics carry."""


class ServedModelsError(ValueError):
    """The models setting cannot be read; the message names the entry and the fix."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model to serve: a catalog model, or a local GGUF file under a name of its own."""

    name: str
    catalog: CatalogModel | None = None
    path: Path | None = None


def parse_served_models(spec: str, variable: str = "CHATMESH_INFERENCE_MODELS") -> list[ServedModel]:
    """The models `spec` names, in order (the first is the default). Raises `ServedModelsError` for an
    unknown catalog name, a bad NAME, a missing path or a name given twice; empty `spec` gives []."""
    served: list[ServedModel] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, separator, path = entry.partition("=")
        name = name.strip()
        if not _NAME.match(name):
            raise ServedModelsError(
                f"{variable}: {name[:100]!r} is not a model name (letters, digits, '.', '_', ':', '-';"
                " at most 100 characters)"
            )
        if separator:
            if not path.strip():
                raise ServedModelsError(f"{variable}: {entry!r} names no file after '='; use NAME=PATH")
            served.append(ServedModel(name, path=Path(path.strip()).expanduser()))
        else:
            try:
                served.append(ServedModel(name, catalog=catalog_model(name)))
            except KeyError as exc:
                raise ServedModelsError(f"{variable}: {exc}") from None
    names = [model.name for model in served]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ServedModelsError(f"{variable}: {', '.join(repeated)} named more than once")
    return served
