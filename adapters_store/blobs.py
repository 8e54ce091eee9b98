"""Content-addressed adapter directories: ``blobs/<sha256 digest>/<files>``.

A blob directory appears by one rename of a finished, fsynced staging directory, so it is
either absent or complete. Many adapter versions may share one blob; the store decides when
one is unreferenced. Each version's manifest lives beside the blobs, in ``manifests/`` next to
``blobs/`` (:mod:`.manifests`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import DIGEST, fsync_dir
from .manifests import LocalManifests
from .staging import StagingArea


def present_digests(root: Path) -> set[str]:
    """The blob directories under ``root``, creating nothing (empty if ``root`` does not exist)."""
    try:
        return {name for name in os.listdir(root) if DIGEST.fullmatch(name)}
    except FileNotFoundError:
        return set()


class BlobStore:
    def __init__(self, root: Path, staging: StagingArea) -> None:
        self.root = root
        self._staging = staging
        root.mkdir(parents=True, exist_ok=True)
        self.manifests = LocalManifests(root.parent / "manifests")

    def path(self, digest: str) -> Path:
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest

    def local(self, digest: str) -> Path:
        """The blob's files on this machine: the blob directory itself."""
        return self.path(digest)

    def place(self, staged: Path, digest: str) -> bool:
        """Publish ``staged`` as the blob ``digest``; ``False`` if that blob already existed.

        An existing blob is kept as is (same digest, same content) and ``staged`` is left for
        its owner to discard. Callers serialise this with :meth:`remove` (the store does so
        under its metadata write lock), so the existence check cannot race.
        """
        target = self.path(digest)
        if target.exists():
            return False
        os.rename(staged, target)
        fsync_dir(self.root)
        return True

    def remove(self, digest: str) -> None:
        self._staging.discard(self.path(digest))

    def digests(self) -> set[str]:
        """Every blob directory present."""
        return present_digests(self.root)
