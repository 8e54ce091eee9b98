"""``loraplex store backup DIR``: a consistent copy of a store directory, taken while it serves.

The database is copied with SQLite's online backup API while this process holds the store's
writers' lock (``BEGIN IMMEDIATE`` on a connection of its own), so no publish or delete commits
meanwhile, and under the same lock the blobs and manifests are brought level with that moment:
the copy never has a row without its blob, nor a blob the store had already removed. Blobs are
immutable, so the bulk of their bytes is copied before the lock is taken; writers then wait
only for the database pages, the manifests and whatever blobs changed in between (a writer
waits up to 30 s for the lock, see :mod:`.sqlite_metadata`). Readers and serving never wait.

The copy is itself a store directory (``registry.sqlite3``, ``blobs/``, ``manifests/``): serve
it with ``--store DIR``, or put it back in place of the lost store. Endpoints are in the
database and so are kept, unlike with ``loraplex store rebuild``.

A shared registry (``--store postgresql://...``) is backed up with PostgreSQL's own tools, see
docs/SCALE_OUT.md.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .blobs import present_digests
from .errors import StoreError
from .files import AdapterFile, fsync_dir, seal
from .sqlite_metadata import probe_file

DATABASE = "registry.sqlite3"


@dataclass(frozen=True)
class BackupReport:
    dest: Path
    versions: int
    endpoints: int
    blobs: int


def backup(root: Path, dest: Path) -> BackupReport:
    """Copy the store at ``root`` into ``dest``, a new or empty directory."""
    database = root / DATABASE
    problem = probe_file(database)
    if problem is not None:
        raise StoreError("failed_precondition", f"adapter store {root}: {DATABASE} {problem.text}; nothing to back up")
    _prepare(dest)
    for digest in present_digests(root / "blobs"):
        _copy_blob(root, dest, digest)
    with _writers_lock(database):
        _copy_database(database, dest / DATABASE)
        present = present_digests(root / "blobs")
        for digest in present - present_digests(dest / "blobs"):
            _copy_blob(root, dest, digest)
        for digest in present_digests(dest / "blobs") - present:
            shutil.rmtree(dest / "blobs" / digest)
        _copy_manifests(root / "manifests", dest / "manifests")
    return _report(dest, len(present))


def _prepare(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreError("already_exists", f"backup destination {dest} exists and is not an empty directory; "
                                           "name a new one")
    (dest / "blobs").mkdir(parents=True, exist_ok=True)


@contextmanager
def _writers_lock(database: Path) -> Iterator[None]:
    """Hold the store's write lock, as every publish and delete takes it, and change nothing."""
    conn = sqlite3.connect(database, timeout=30.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def _copy_database(source: Path, target: Path) -> None:
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def _copy_blob(root: Path, dest: Path, digest: str) -> None:
    """Copy one blob as the store places one: into a scratch directory, sealed, then renamed."""
    source, partial = root / "blobs" / digest, dest / "blobs" / f".partial-{digest}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        names = sorted(os.listdir(source))
        for name in names:
            shutil.copyfile(source / name, partial / name)
    except FileNotFoundError:  # removed since it was listed: the pass under the lock settles what the copy holds
        shutil.rmtree(partial)
        return
    seal(partial, [AdapterFile(name, (partial / name).stat().st_size) for name in names])
    os.rename(partial, dest / "blobs" / digest)
    fsync_dir(dest / "blobs")


def _copy_manifests(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))


def _report(dest: Path, blobs: int) -> BackupReport:
    conn = sqlite3.connect(dest / DATABASE)
    try:
        (versions,) = conn.execute("SELECT COUNT(*) FROM adapters").fetchone()
        (endpoints,) = conn.execute("SELECT COUNT(*) FROM endpoints").fetchone()
    finally:
        conn.close()
    return BackupReport(dest=dest, versions=int(versions), endpoints=int(endpoints), blobs=blobs)
