"""`chatmesh token USER` signs with the mesh's secret or refuses, run as a user would: the real CLI in a
process of its own, in a directory of the test's choosing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatmesh.common.auth import JwtKeys, verify_token

SECRET = "the-mesh-s-own-secret-" + "s" * 40


def chatmesh(cwd: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """`chatmesh ARGS` in `cwd`, with no JWT setting but `settings`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHATMESH_CHAT_JWT")}
    return subprocess.run(
        [sys.executable, "-m", "chatmesh", *args],
        cwd=cwd,
        env={**env, **settings},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    """The directory a mesh ran in: its secret under .run/."""
    directory = tmp_path / "mesh"
    (directory / ".run").mkdir(parents=True)
    (directory / ".run" / "jwt-secret").write_text(SECRET + "\n")
    return directory


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    return directory


def test_outside_the_mesh_s_directory_it_refuses_and_creates_nothing(elsewhere: Path) -> None:
    done = chatmesh(elsewhere, "token", "ada")
    assert done.returncode != 0
    assert done.stdout == ""
    assert str(elsewhere / ".run" / "jwt-secret") in done.stderr
    assert "CHATMESH_CHAT_JWT_SECRET_FILE" in done.stderr
    assert not (elsewhere / ".run").exists()


def test_the_terminal_client_refuses_likewise(elsewhere: Path) -> None:
    done = chatmesh(elsewhere, "chat", "--list")
    assert done.returncode != 0
    assert "CHATMESH_CHAT_JWT_SECRET_FILE" in done.stderr and "Traceback" not in done.stderr
    assert not (elsewhere / ".run").exists()


def test_in_the_mesh_s_directory_it_signs_with_the_mesh_s_secret(mesh_dir: Path) -> None:
    done = chatmesh(mesh_dir, "token", "ada")
    assert done.returncode == 0, done.stderr
    assert verify_token(JwtKeys.hs256(SECRET), done.stdout.strip()) == "ada"


def test_elsewhere_the_setting_finds_the_mesh_s_secret(mesh_dir: Path, elsewhere: Path) -> None:
    secret_file = str(mesh_dir / ".run" / "jwt-secret")
    done = chatmesh(elsewhere, "token", "ada", CHATMESH_CHAT_JWT_SECRET_FILE=secret_file)
    assert done.returncode == 0, done.stderr
    assert verify_token(JwtKeys.hs256(SECRET), done.stdout.strip()) == "ada"
    done = chatmesh(elsewhere, "token", "ada", CHATMESH_CHAT_JWT_SECRET=SECRET)
    assert done.returncode == 0, done.stderr
    assert verify_token(JwtKeys.hs256(SECRET), done.stdout.strip()) == "ada"
    assert not (elsewhere / ".run").exists()
