"""Install llama-cpp-python built for every CPU of its architecture, never only for the build machine.

Why: `pip install llama-cpp-python` compiles llama.cpp with `GGML_NATIVE=ON`, i.e. for the CPU it is
built on. On a Xeon that advertises AMX this enables llama.cpp's AMX weight-repack path, which dies with
SIGILL where the kernel does not grant AMX tile state; and pip caches that wheel under a key that knows
nothing about CPUs, so the native build of one machine is later installed on another.

So the build here is fixed: on x86-64 the Haswell baseline (SSE4.2, AVX, AVX2, FMA, F16C, BMI2), which
every x86-64 server CPU of the last decade has, with no AVX-512 and no AMX; on other architectures the
architecture's generic baseline. The wheel is built without pip's cache into a folder whose name is the
version plus a hash of the build flags, so a cached wheel is only ever reused for the same portable
build. `--check` verifies what is installed (used by the tests). Measured trade-off: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"

_X86_64_FLAGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_SSE42=ON",
    "-DGGML_AVX=ON",
    "-DGGML_F16C=ON",
    "-DGGML_FMA=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_AVX512=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DGGML_AVX_VNNI=OFF",
)
_GENERIC_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ALL_VARIANTS=OFF", "-DGGML_BACKEND_DL=OFF")

# Features the x86-64 build must not use: their presence in llama.cpp's system info means a native build.
FORBIDDEN_FEATURES = ("AVX512", "AMX", "AVX_VNNI", "AVX512_VNNI")


def cmake_flags() -> tuple[str, ...]:
    return _X86_64_FLAGS if platform.machine().lower() in {"x86_64", "amd64"} else _GENERIC_FLAGS


def wheel_dir() -> Path:
    key = hashlib.sha256(" ".join(cmake_flags()).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "chatmesh" / "wheels" / f"llama-cpp-python-{VERSION}-{platform.machine()}-portable-{key}"


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def build_wheel(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_flags()))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    print(
        f">> building llama-cpp-python {VERSION} for every {platform.machine()} CPU (portable flags;"
        " about 8 minutes on 2 cores, once per machine)",
        flush=True,
    )
    _pip("wheel", "--no-cache-dir", "--no-deps", "--no-binary", "llama-cpp-python",
         f"llama-cpp-python=={VERSION}", "-w", str(target), env=env)  # fmt: skip


def installed_system_info() -> str:
    """llama.cpp's own report of the CPU features it was built with, from a fresh interpreter."""
    probe = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    return subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.strip()


def check() -> int:
    info = installed_system_info()
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        print(info)
        return 0
    used = [part.strip() for part in info.split("|") if part.strip().endswith("= 1")]
    bad = [u for u in used if u.split(" = ")[0].strip() in FORBIDDEN_FEATURES]
    if bad:
        print(
            f"llama-cpp-python here is a CPU-specific build ({', '.join(bad)}): it will crash on CPUs"
            f" without those features. Fix: {sys.executable} tools/install_llama.py --force",
            file=sys.stderr,
        )
        return 1
    print(f"portable llama.cpp build: {info}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the installed build is portable")
    parser.add_argument("--force", action="store_true", help="rebuild the wheel even if one is cached")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    target = wheel_dir()
    if args.force or not list(target.glob("llama_cpp_python-*.whl")):
        build_wheel(target)
    else:
        print(f">> llama-cpp-python {VERSION}: portable wheel from {target}", flush=True)
    _pip("install", "--force-reinstall", "--no-deps", "--no-index", "--find-links", str(target),
         f"llama-cpp-python=={VERSION}")  # fmt: skip
    # Its dependencies (numpy, ...) come with the project; `--check` runs once they are in.
    return 0


if __name__ == "__main__":
    sys.exit(main())
