"""Generate (or check) the Python stubs and Envoy's descriptor set from `protos/`.

    python tools/protos.py            # regenerate into the repository
    python tools/protos.py --check    # fail when the committed output differs from a fresh generation
    python tools/protos.py --buf-image PATH   # descriptor set with source info, for `buf lint`

The google/api/*.proto imports come from the installed googleapis-common-protos package, so the same
files feed the stubs, Envoy's transcoder and buf.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import google.api.annotations_pb2
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# Envoy's descriptor set is package data of the gateway, so that an installed chatmesh runs it.
DESCRIPTOR_SET = Path("chatmesh") / "gateway" / "data" / "chatmesh.pb"
GOOGLEAPIS_ROOT = Path(google.api.annotations_pb2.__file__).resolve().parent.parent.parent
WELL_KNOWN_ROOT = Path(grpc_tools.__file__).resolve().parent / "_proto"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def run_protoc(args: list[str]) -> None:
    include = [f"-I{PROTO_ROOT}", f"-I{GOOGLEAPIS_ROOT}", f"-I{WELL_KNOWN_ROOT}"]
    code = protoc.main(["grpc_tools.protoc", *include, *args, *proto_files()])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generate(out: Path) -> list[Path]:
    """Write stubs and the descriptor set under `out`; return the paths written, relative to `out`."""
    (out / DESCRIPTOR_SET.parent).mkdir(parents=True, exist_ok=True)
    run_protoc(
        [
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            "--include_imports",
            f"--descriptor_set_out={out / DESCRIPTOR_SET}",
        ]
    )
    # Packages for the generated modules: chatmesh/<service>/v1/__init__.py.
    for proto in proto_files():
        package_dir = out / Path(proto).parent
        while package_dir != out / "chatmesh":
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        drifted = [
            str(rel)
            for rel in fresh
            if not (ROOT / rel).exists() or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, shallow=False)
        ]
    if drifted:
        print("Generated protobuf output is out of date: " + ", ".join(drifted), file=sys.stderr)
        print("Fix: run `make protos` and commit the result.", file=sys.stderr)
        return 1
    print(f"protobuf output up to date ({len(fresh)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if committed output is stale")
    parser.add_argument("--buf-image", type=Path, help="write a descriptor set with source info for buf")
    args = parser.parse_args()
    if args.check:
        return check()
    if args.buf_image:
        run_protoc(["--include_imports", "--include_source_info", f"--descriptor_set_out={args.buf_image}"])
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
