"""The files of one adapter: a flat directory of regular files, checked, hashed and copied.

Nothing here follows a symlink or descends into a subdirectory: an adapter is exactly the
regular files directly inside its directory, each with a valid name (see :mod:`.names`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .names import validate_file_name

# Formats that can run code when loaded; weights must be safetensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
MAX_FILES = 256
DIGEST = re.compile(r"[0-9a-f]{64}")  # what :func:`digest_files` returns, and so every blob's name
_CHUNK = 1 << 20


@dataclass(frozen=True)
class AdapterFile:
    name: str
    size: int


def scan_flat_dir(directory: Path, max_bytes: int, where: str) -> list[AdapterFile]:
    """The adapter files in ``directory`` sorted by name; every entry that is not one is refused.

    All refused entries are listed in one error, so nothing is ever left out silently.
    """
    try:
        mode = os.lstat(directory).st_mode
    except FileNotFoundError:
        raise StoreError("invalid", f"{where}: no such directory") from None
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        raise StoreError("invalid", f"{where}: not a directory (a symlink is refused too)")
    files: list[AdapterFile] = []
    refused: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            problem = _problem(entry)
            if problem:
                refused.append(problem)
            else:
                files.append(AdapterFile(entry.name, entry.stat(follow_symlinks=False).st_size))
    if refused:
        raise StoreError(
            "invalid",
            f"{where}: refused {len(refused)} entr{'y' if len(refused) == 1 else 'ies'} (an adapter is a flat "
            f"directory of regular files; nothing was registered): {'; '.join(sorted(refused))}",
        )
    if not files:
        raise StoreError("invalid", f"{where}: the directory is empty")
    if len(files) > MAX_FILES:
        raise StoreError("invalid", f"{where}: {len(files)} files; the limit is {MAX_FILES}")
    _check_total(sum(f.size for f in files), max_bytes, where)
    return sorted(files, key=lambda f: f.name)


def _problem(entry: os.DirEntry) -> str | None:
    if entry.is_symlink():
        return f"{entry.name!r} is a symlink (copy the file it points to instead)"
    if entry.is_dir(follow_symlinks=False):
        return f"{entry.name!r} is a subdirectory"
    if not entry.is_file(follow_symlinks=False):
        return f"{entry.name!r} is not a regular file"
    try:
        validate_file_name(entry.name)
    except StoreError as exc:
        return str(exc)
    if entry.name.lower().endswith(PICKLE_SUFFIXES):
        return f"{entry.name!r} is a pickle-capable format; weights must be safetensors and are never unpickled"
    return None


def _check_total(total: int, max_bytes: int, where: str) -> None:
    if total > max_bytes:
        raise StoreError("invalid", f"{where}: files total {total} bytes, over the limit of {max_bytes} bytes")


def digest_files(directory: Path, files: list[AdapterFile], max_bytes: int, where: str) -> tuple[str, int]:
    """``(digest, total bytes)`` of the adapter's content.

    The digest is the sha256 of the lines ``"<sha256 of file> <file name>\\n"`` in file-name
    order (the shape of ``sha256sum`` output), so it covers names and contents and nothing
    else. Sizes are re-measured while hashing, so a file that grew since it was scanned
    cannot slip past the size limit.
    """
    listing = hashlib.sha256()
    total = 0
    for f in sorted(files, key=lambda f: f.name):
        content = hashlib.sha256()
        with open(_open_regular(directory / f.name, where), "rb", closefd=True) as fh:
            while chunk := fh.read(_CHUNK):
                content.update(chunk)
                total += len(chunk)
                _check_total(total, max_bytes, where)
        listing.update(f"{content.hexdigest()} {f.name}\n".encode())
    return listing.hexdigest(), total


def copy_files(source: Path, dest: Path, files: list[AdapterFile], max_bytes: int, where: str) -> None:
    """Copy ``files`` from ``source`` into the empty directory ``dest``, never following a symlink."""
    total = 0
    for f in files:
        with open(_open_regular(source / f.name, where), "rb", closefd=True) as src, open(dest / f.name, "xb") as out:
            while chunk := src.read(_CHUNK):
                total += len(chunk)
                _check_total(total, max_bytes, where)
                out.write(chunk)


def seal(directory: Path, files: list[AdapterFile]) -> None:
    """Make the files read-only and durable before the directory is published."""
    for f in files:
        path = directory / f.name
        os.chmod(path, 0o444)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (a rename or a new file in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_regular(path: Path, where: str) -> int:
    """A file descriptor for ``path``, refusing a symlink or a non-regular file swapped in since the scan."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise StoreError("invalid", f"{where}: cannot open {path.name!r}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError("invalid", f"{where}: {path.name!r} is not a regular file")
    return fd
