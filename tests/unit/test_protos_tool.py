"""`tools/protos.py`: regeneration and the drift check, on a small proto tree of its own."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from google.protobuf import descriptor_pb2

from gateway.api import default_descriptor_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def protos_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protos_tool", REPO / "tools" / "protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A repository root with two protos (chatmesh.foo.v1 and chatmesh.bar.v1), nothing generated yet."""
    proto_root = tmp_path / "protos"
    for name in ("foo", "bar"):
        path = proto_root / "chatmesh" / name / "v1" / f"{name}.proto"
        path.parent.mkdir(parents=True)
        path.write_text(
            f'syntax = "proto3";\npackage chatmesh.{name}.v1;\nmessage Thing {{ string name = 1; }}\n'
        )
    return tmp_path, proto_root


def test_a_fresh_generation_passes_the_check(
    protos_tool: ModuleType, tree: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, proto_root = tree
    protos_tool.write(root, proto_root)
    assert (root / "chatmesh/foo/v1/foo_pb2.py").exists() and (root / "chatmesh/foo/v1/__init__.py").exists()
    assert protos_tool.check(root, proto_root) == 0, capsys.readouterr().err


def test_a_changed_generated_file_fails_the_check(
    protos_tool: ModuleType, tree: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, proto_root = tree
    protos_tool.write(root, proto_root)
    (proto_root / "chatmesh/foo/v1/foo.proto").write_text(
        'syntax = "proto3";\npackage chatmesh.foo.v1;\nmessage Thing { string title = 1; }\n'
    )
    assert protos_tool.check(root, proto_root) == 1
    assert "out of date: " in capsys.readouterr().err


def test_a_left_over_generated_file_fails_the_check_until_regenerated(
    protos_tool: ModuleType, tree: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, proto_root = tree
    protos_tool.write(root, proto_root)
    (proto_root / "chatmesh/bar/v1/bar.proto").unlink()  # its stubs should go with it
    assert protos_tool.check(root, proto_root) == 1
    err = capsys.readouterr().err
    for name in ("bar_pb2.py", "bar_pb2.pyi", "bar_pb2_grpc.py"):
        assert f"chatmesh/bar/v1/{name}" in err, err
    assert "foo_pb2" not in err

    protos_tool.write(root, proto_root)
    assert not (root / "chatmesh/bar/v1/bar_pb2.py").exists()
    assert (root / "chatmesh/foo/v1/foo_pb2.py").exists()
    assert protos_tool.check(root, proto_root) == 0, capsys.readouterr().err


def test_the_descriptor_set_carries_the_error_detail_types(
    protos_tool: ModuleType, tree: tuple[Path, Path]
) -> None:
    # Envoy renders REST error bodies from grpc-status-details-bin only if it knows the detail types.
    root, proto_root = tree
    protos_tool.write(root, proto_root)
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(
        (root / protos_tool.DESCRIPTOR_SET).read_bytes()
    )
    names = {file.name for file in descriptors.file}
    assert {"chatmesh/foo/v1/foo.proto", "google/rpc/error_details.proto"} <= names
    assert not (root / "google").exists(), "no stubs are generated for the extra descriptor files"


def test_envoy_yaml_is_the_config_of_the_default_settings(
    protos_tool: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """envoy/envoy.yaml, the config an Envoy user reads, is what the gateway renders for the defaults
    now (`make protos` rewrites it, `make lint` checks it too), whatever the environment says."""
    monkeypatch.setenv("CHATMESH_GATEWAY_LISTEN_PORT", "1234")
    monkeypatch.chdir(tmp_path)  # the default secret file is relative: none may be created
    committed = (REPO / protos_tool.ENVOY_YAML).read_text()
    assert protos_tool.envoy_yaml(default_descriptor_path()) == committed, (
        "envoy/envoy.yaml is out of date: run `make protos` and commit it"
    )
    assert os.environ["CHATMESH_GATEWAY_LISTEN_PORT"] == "1234" and not any(tmp_path.iterdir())
    config = yaml.safe_load(committed)
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    assert "<JWT secret, base64url>" in committed and "<gateway>/data/chatmesh.pb" in committed
    assert str(REPO) not in committed, "no path of this machine"
