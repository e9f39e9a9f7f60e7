"""The installed llama.cpp is the portable build, so the suite proves what every machine of this kind runs."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(platform.machine().lower() not in {"x86_64", "amd64"}, reason="x86-64 build flags")
def test_installed_llama_cpp_uses_no_cpu_specific_instructions() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "install_llama.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    features = dict(
        part.strip().split(" = ") for part in result.stdout.split(":", 2)[-1].split("|") if " = " in part
    )
    # The Haswell baseline is there (fast on every x86-64 server CPU of the last decade) ...
    assert features.get("AVX2") == "1" and features.get("FMA") == "1"
    # ... and nothing that only some CPUs of this kind have (AMX died with SIGILL on one of them).
    assert not any(name.startswith(("AVX512", "AMX", "AVX_VNNI")) for name in features), features
