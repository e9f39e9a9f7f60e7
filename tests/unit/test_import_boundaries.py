"""No part imports another part's modules: each service, the gateway and `chatmesh` (stubs, shared runtime,
SDK, launcher and CLI) import themselves, `chatmesh` and third-party code only. Settings two parts need
live in `chatmesh.common`; the launcher renders a service's environment from them instead of importing
the service. Read from the source (every import statement, those inside functions too), so an arrow back
up fails here before anyone runs the mesh."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PARTS = {
    "chatmesh": ROOT / "chatmesh",
    "gateway": ROOT / "envoy" / "gateway",
    "chat_service": ROOT / "chat_service",
    "inference_service": ROOT / "inference_service",
    "embedding_service": ROOT / "embedding_service",
}
"""Each top-level package and where it lives."""

SEPARATE = frozenset(PARTS) - {"chatmesh"}
"""The parts no other part may import: the services and the gateway (all may import `chatmesh`)."""

ALLOWED = {
    ("chatmesh.mesh", "gateway"): "the launcher (`chatmesh run`) renders and runs Envoy in front of the chat"
    " replicas with the gateway's own settings and runner",
}
"""(importing module, imported part) pairs that are allowed, and why."""


def _modules(part: str) -> dict[str, Path]:
    """Every module of `part`, by its dotted name."""
    root = PARTS[part]
    modules = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        names = [part, *relative.parts]
        if names[-1] == "__init__":
            names.pop()
        modules[".".join(names)] = path
    return modules


def _imported_parts(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file at `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.partition(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.partition(".")[0]))
    return found


def _crossings() -> list[tuple[str, str, str]]:
    """(importing module, `file:line`, imported part) of every import of another separate part."""
    crossings = []
    for part in PARTS:
        for module, path in _modules(part).items():
            for line, imported in _imported_parts(path):
                if imported in SEPARATE and imported != part:
                    crossings.append((module, f"{path.relative_to(ROOT)}:{line}", imported))
    return crossings


def test_every_part_is_read() -> None:
    assert all(_modules(part) for part in PARTS)
    assert {"chatmesh.mesh", "chatmesh.cli", "chatmesh.common.settings"} <= set(_modules("chatmesh"))


def test_no_part_imports_another_part_s_modules() -> None:
    wrong = [
        f"{where}: {module} imports {imported}"
        for module, where, imported in _crossings()
        if (module, imported) not in ALLOWED
    ]
    assert not wrong, (
        "settings or code two parts need belong in chatmesh/common (see chatmesh.common.service_settings):\n"
        + "\n".join(wrong)
    )


def test_each_allowed_import_is_still_made() -> None:
    # An exception nobody needs any more is taken off the list rather than left to excuse a new import.
    made = {(module, imported) for module, _, imported in _crossings()}
    assert set(ALLOWED) <= made, set(ALLOWED) - made
