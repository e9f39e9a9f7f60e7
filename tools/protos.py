"""Generate (or check) the Python stubs, Envoy's descriptor set, the REST API's OpenAPI document
(`envoy/gateway/data/openapi.json`) and the gateway's Envoy config for the default settings
(`envoy/envoy.yaml`) from `protos/`.

    python tools/protos.py            # regenerate into the repository (deleting stubs of removed protos)
    python tools/protos.py --check    # fail when the committed output differs from a fresh generation,
                                      # or a generated file is left over from a removed .proto
    python tools/protos.py --buf-image PATH   # descriptor set with source info, for `buf lint`

The google/api/*.proto imports come from the installed googleapis-common-protos package, so the same
files feed the stubs, Envoy's transcoder and buf.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import filecmp
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.api.annotations_pb2
import grpc_tools
import yaml
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The gateway package (import name `gateway`) lives in envoy/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "envoy"))

from gateway.api import PUBLIC_SERVICES
from gateway.config import build_envoy_config
from gateway.openapi import openapi_document
from gateway.routes import WEB_DIRECTORY
from gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# Envoy's descriptor set is package data of the gateway, so that an installed chatmesh runs it.
DESCRIPTOR_SET = Path("envoy") / "gateway" / "data" / "chatmesh.pb"
OPENAPI_DOCUMENT = Path("envoy") / "gateway" / "data" / "openapi.json"
ENVOY_YAML = Path("envoy") / "envoy.yaml"
"""The gateway's Envoy config for the default settings, for Envoy users to read (drift-checked here)."""
GENERATED_PACKAGE = Path("chatmesh")
"""Where the Python stubs go; any `*_pb2*.py[i]` under it that a fresh generation lacks is stale."""
GENERATED_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
# Not imported by our protos, but the services attach them to error statuses (grpc-status-details-bin),
# and Envoy's transcoder can only render the REST error body when their types are in its descriptor set.
DESCRIPTOR_SET_EXTRAS = ["google/rpc/error_details.proto"]
GOOGLEAPIS_ROOT = Path(google.api.annotations_pb2.__file__).resolve().parent.parent.parent
WELL_KNOWN_ROOT = Path(grpc_tools.__file__).resolve().parent / "_proto"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    return sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))


def run_protoc(args: list[str], proto_root: Path = PROTO_ROOT, extra_files: list[str] | None = None) -> None:
    include = [f"-I{proto_root}", f"-I{GOOGLEAPIS_ROOT}", f"-I{WELL_KNOWN_ROOT}"]
    files = [*proto_files(proto_root), *(extra_files or [])]
    code = protoc.main(["grpc_tools.protoc", *include, *args, *files])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generate(out: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write stubs and the descriptor set under `out`; return the paths written, relative to `out`."""
    (out / DESCRIPTOR_SET.parent).mkdir(parents=True, exist_ok=True)
    run_protoc([f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"], proto_root)
    # A second run for the descriptor set, which also carries the error-detail types; stubs for those
    # come from googleapis-common-protos, not from us.
    run_protoc(
        ["--include_imports", f"--descriptor_set_out={out / DESCRIPTOR_SET}"],
        proto_root,
        DESCRIPTOR_SET_EXTRAS,
    )
    # The REST API's OpenAPI document, from that descriptor set (served by the gateway), and the
    # gateway's config for the default settings.
    files = descriptor_pb2.FileDescriptorSet.FromString((out / DESCRIPTOR_SET).read_bytes())
    declared = {f"{file.package}.{service.name}" for file in files.file for service in file.service}
    if declared >= set(PUBLIC_SERVICES):
        document = json.dumps(openapi_document(files), indent=2, ensure_ascii=False) + "\n"
        (out / OPENAPI_DOCUMENT).write_text(document, encoding="utf-8")
        (out / ENVOY_YAML).write_text(envoy_yaml(out / DESCRIPTOR_SET), encoding="utf-8")
    # Packages for the generated modules: chatmesh/<service>/v1/__init__.py.
    for proto in proto_files(proto_root):
        package_dir = out / Path(proto).parent
        while package_dir != out / GENERATED_PACKAGE:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())


ENVOY_YAML_HEADER = """\
# The gateway's Envoy config for the default settings: what `python -m gateway` runs when no
# CHATMESH_GATEWAY_* variable is set. Generated by `make protos` (tools/protos.py) from envoy/gateway/ and
# the descriptor set, and checked by `make lint`: do not edit it, change envoy/gateway/ and regenerate.
# `python -m gateway --print` prints the config for your own settings (as JSON, which Envoy reads too).
#
# Values that differ per machine are placeholders:
#   <gateway>                the installed `gateway` package's directory (envoy/gateway/ in this repository):
#                            the descriptor set and the OpenAPI document in <gateway>/data, the web page
#                            in <gateway>/web
#   <JWT secret, base64url>  the HS256 secret tokens are checked with (CHATMESH_GATEWAY_JWT_SECRET, else
#                            the file CHATMESH_GATEWAY_JWT_SECRET_FILE, by default .run/jwt-secret),
#                            base64url without padding; never written here
#   <API-key secret, base64url>  the HS256 secret API keys are checked with
#                            (CHATMESH_GATEWAY_API_KEY_SECRET, else the file
#                            CHATMESH_GATEWAY_API_KEY_SECRET_FILE, by default .run/api-key-secret)
"""
_SECRET_STANDIN = "envoy.yaml-secret-" + "x" * 32
_SECRET_PLACEHOLDER = "<JWT secret, base64url>"
_API_KEY_SECRET_STANDIN = "envoy.yaml-api-key-secret-" + "x" * 32
_API_KEY_SECRET_PLACEHOLDER = "<API-key secret, base64url>"


@contextlib.contextmanager
def _without_gateway_environment() -> Iterator[None]:
    """The defaults, whatever the shell running this exports."""
    saved = {name: value for name, value in os.environ.items() if name.startswith("CHATMESH_GATEWAY_")}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


class _Dumper(yaml.SafeDumper):
    """Block style, literal blocks for multi-line text (the Lua program), no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_text)


def envoy_yaml(descriptor_path: Path) -> str:
    """The gateway's config for the default settings as YAML, with the descriptor set at
    `descriptor_path`; per-machine values are placeholders (see ENVOY_YAML_HEADER)."""
    with _without_gateway_environment():
        # A stand-in secret, so that no secret file is read or created; the placeholder replaces it.
        settings = GatewaySettings(jwt_secret=_SECRET_STANDIN, api_key_secret=_API_KEY_SECRET_STANDIN)
    config = build_envoy_config(settings, descriptor_path)
    text = json.dumps(config)
    for path, placeholder in (
        (descriptor_path.resolve().parent, "<gateway>/data"),
        (WEB_DIRECTORY, "<gateway>/web"),
    ):
        text = text.replace(json.dumps(str(path))[1:-1], placeholder)
    for secret, placeholder in (
        (_SECRET_STANDIN, _SECRET_PLACEHOLDER),
        (_API_KEY_SECRET_STANDIN, _API_KEY_SECRET_PLACEHOLDER),
    ):
        standin = base64.urlsafe_b64encode(secret.encode()).rstrip(b"=").decode()
        text = text.replace(standin, placeholder)
        assert secret not in text and standin not in text
    body = yaml.dump(json.loads(text), Dumper=_Dumper, sort_keys=False, width=1 << 20, allow_unicode=True)
    return ENVOY_YAML_HEADER + body


def stale_files(fresh: list[Path], root: Path = ROOT) -> list[Path]:
    """Generated-looking files under `root` that a fresh generation does not produce (their .proto was
    renamed or deleted), relative to `root`."""
    expected = set(fresh)
    found = {
        path.relative_to(root)
        for pattern in GENERATED_PATTERNS
        for path in (root / GENERATED_PACKAGE).rglob(pattern)
    }
    return sorted(found - expected)


def check(root: Path = ROOT, proto_root: Path = PROTO_ROOT) -> int:
    """0 if the generated files under `root` match a fresh generation and none is left over, else 1."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        drifted = [
            str(rel)
            for rel in fresh
            if not (root / rel).exists() or not filecmp.cmp(Path(tmp) / rel, root / rel, shallow=False)
        ]
    stale = [str(rel) for rel in stale_files(fresh, root)]
    if drifted:
        print(
            "Generated output (from protos/ and envoy/gateway/) is out of date: " + ", ".join(drifted),
            file=sys.stderr,
        )
    if stale:
        print("Stale generated files (no .proto produces them): " + ", ".join(stale), file=sys.stderr)
    if drifted or stale:
        print("Fix: run `make protos` and commit the result.", file=sys.stderr)
        return 1
    print(f"generated output up to date ({len(fresh)} files)")
    return 0


def write(root: Path = ROOT, proto_root: Path = PROTO_ROOT) -> None:
    """Regenerate into `root`, deleting generated files that no .proto produces any more."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        for rel in fresh:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, root / rel)
            print(f"wrote {rel}")
    for rel in stale_files(fresh, root):
        (root / rel).unlink()
        print(f"deleted {rel}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if committed output is stale")
    parser.add_argument("--buf-image", type=Path, help="write a descriptor set with source info for buf")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    if args.buf_image:
        run_protoc(["--include_imports", "--include_source_info", f"--descriptor_set_out={args.buf_image}"])
        return 0
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
