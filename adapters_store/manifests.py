"""Sidecar manifests: what each published version is, kept beside the blobs, so the registry can
be re-created from the blobs alone (``loraplex store rebuild``).

Layout, next to ``blobs/`` (``<store>/manifests/`` for a directory store, ``<shared>/manifests/``
or ``<url>/manifests/`` for a shared registry)::

    manifests/<digest>/<name>@<version>.json

What was decided:

- One file per version, filed under the blob it uses. A blob is content-addressed and shared by
  every version with identical content, so two versions sharing a blob have two manifests in one
  directory, each written whole by one atomic replace: no shared list to read, modify and write.
- A manifest holds the version's row (name, version, kind, digest, size, publish time, the
  validation metadata) and the sha256 of its ``adapter_config.json``, which rebuild checks the
  blob against before trusting the manifest.
- Deleting a version turns its manifest into a tombstone (``deleted_at`` set) instead of removing
  it, and tombstones stay when the blob goes (a few hundred bytes each): rebuild then knows the
  highest version ever given to a name and never hands a deleted number out again.
- Manifests are written after the database commit (of a publish, of a delete), under the
  writers' lock, when the operation's journal entry is settled (:mod:`.journal`): a live
  manifest therefore always describes a version some database committed, which is what lets the
  journal trust it, and a crash between commit and manifest is repaired at the next open.
  Opening a store also writes the manifest of any row without one (stores written before
  manifests existed, or rows an older replica added during a rolling upgrade).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from .errors import StoreError
from .files import DIGEST, fsync_dir
from .metadata import Row
from .names import validate_name

FORMAT = 1
CONFIG_FILE = "adapter_config.json"
_ROW_FIELDS = ("name", "version", "kind", "digest", "size_bytes", "metadata")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    kind: str
    digest: str
    size_bytes: int
    published_at: float
    config_sha256: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    deleted_at: float | None = None

    @property
    def live(self) -> bool:
        return self.deleted_at is None

    @property
    def ref(self) -> tuple[str, int]:
        return self.name, self.version

    @property
    def file_name(self) -> str:
        return f"{self.name}@{self.version}.json"

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True, indent=1) + "\n"

    def row(self) -> Row:
        """The adapter row this manifest re-creates."""
        return {**{k: getattr(self, k) for k in _ROW_FIELDS}, "created_at": self.published_at}

    def deleted(self, at: float) -> Manifest:
        return replace(self, deleted_at=at)

    @classmethod
    def from_row(cls, row: Row, config_sha256: str | None) -> Manifest:
        return cls(name=row["name"], version=row["version"], kind=row["kind"], digest=row["digest"],
                   size_bytes=row["size_bytes"], published_at=row["created_at"], config_sha256=config_sha256,
                   metadata=dict(row["metadata"]))

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Raises ``ValueError`` (``json.JSONDecodeError`` included) for anything but a manifest."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError(f"not a loraplex manifest of format {FORMAT}")
        try:
            found = cls(**data)
        except TypeError as exc:
            raise ValueError(f"unexpected fields: {exc}") from None
        if not isinstance(found.version, int) or found.version < 1:
            raise ValueError(f"version {found.version!r} is not a version number")
        if not isinstance(found.digest, str) or not DIGEST.fullmatch(found.digest):
            raise ValueError(f"digest {found.digest!r} is not a sha256 hex digest")
        try:
            validate_name(found.name)
        except StoreError as exc:
            raise ValueError(exc.message) from None
        return found


@dataclass(frozen=True)
class Scan:
    """Manifests read back, and the files that could not be parsed (path: why)."""

    manifests: list[Manifest]
    unreadable: list[str]


class ManifestFiles(Protocol):
    def write(self, manifest: Manifest) -> None: ...

    def paths(self, digest: str | None = None) -> list[str]: ...

    def read(self, path: str) -> str: ...


class BlobArea(Protocol):
    """What manifests need of a blob store (:class:`~.blobs.BlobStore`, :class:`~.remote_blobs.RemoteBlobStore`)."""

    manifests: ManifestFiles

    def local(self, digest: str) -> Path: ...


def scan(files: ManifestFiles, digest: str | None = None) -> Scan:
    """Read every manifest, or those filed under ``digest``."""
    manifests, unreadable = [], []
    for path in files.paths(digest):
        try:
            manifests.append(Manifest.from_json(files.read(path)))
        except (ValueError, OSError) as exc:
            unreadable.append(f"{path}: {exc}")
    return Scan(sorted(manifests, key=lambda m: m.ref), unreadable)


def filed(files: ManifestFiles) -> set[tuple[str, int]]:
    """Every version with a manifest (live or not), from the file names alone: one listing, no reads."""
    found = set()
    for path in files.paths():
        name, _, version = path.rsplit("/", 1)[-1].removesuffix(".json").rpartition("@")
        if version.isdigit():
            found.add((name, int(version)))
    return found


def record(blobs: BlobArea, row: Row) -> None:
    """Write the live manifest of a committed version."""
    blobs.manifests.write(Manifest.from_row(row, config_sha256(blobs.local(row["digest"]))))


def record_missing(blobs: BlobArea, rows: Iterable[Row], have: set[tuple[str, int]] | None = None,
                   ) -> tuple[int, list[str]]:
    """Write the manifest of every row that has none (``have``: the versions known to have one,
    else every manifest is listed). Returns how many were written, and why each one that could
    not be (its blob unreadable) was not; every open tries those again."""
    have = filed(blobs.manifests) if have is None else have
    written, failed = 0, []
    for row in rows:
        if (row["name"], row["version"]) in have:
            continue
        try:
            record(blobs, row)
            written += 1
        except OSError as exc:
            failed.append(f"{row['name']}@{row['version']}: {exc}")
    return written, failed


def config_sha256(blob_dir: Path) -> str | None:
    """The sha256 of the blob's ``adapter_config.json``; None if it has none."""
    try:
        return hashlib.sha256((blob_dir / CONFIG_FILE).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class LocalManifests:
    """Manifests in a directory on this machine (a store directory, or a shared one)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, manifest: Manifest) -> None:
        """Write or replace one manifest atomically and durably."""
        folder = self.root / manifest.digest
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{manifest.file_name}.{uuid.uuid4().hex}"
        with open(tmp, "x") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / manifest.file_name)
        fsync_dir(folder)

    def paths(self, digest: str | None = None) -> list[str]:
        """Every manifest file, or those filed under ``digest``."""
        base = self.root if digest is None else self.root / digest
        if not base.is_dir():
            return []
        return [str(p) for p in sorted(base.glob("*/*.json" if digest is None else "*.json"))]

    def read(self, path: str) -> str:
        return Path(path).read_text()


class RemoteManifests:
    """Manifests under a bucket URL, one object each (an object store's put is atomic)."""

    def __init__(self, fs: Any, root: str) -> None:
        self._fs = fs
        self.root = root

    def write(self, manifest: Manifest) -> None:
        self._fs.makedirs(f"{self.root}/{manifest.digest}", exist_ok=True)  # a no-op on object stores
        self._fs.pipe_file(f"{self.root}/{manifest.digest}/{manifest.file_name}", manifest.to_json().encode())

    def paths(self, digest: str | None = None) -> list[str]:
        base = self.root if digest is None else f"{self.root}/{digest}"
        if not self._fs.exists(base):
            return []
        return sorted(p for p in self._fs.find(base) if p.endswith(".json"))

    def read(self, path: str) -> str:
        return self._fs.cat_file(path).decode()
