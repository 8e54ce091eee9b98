"""Content-addressed adapter blobs in a bucket (`--blobs s3://bucket/prefix`, or any fsspec URL),
with a local cache the engine loads from.

Layout under the URL: ``<digest>/<files>`` plus ``<digest>/.complete``, written last, so a
reader never takes a half-uploaded blob for a finished one; ``manifests/`` holds each version's
manifest (:mod:`.manifests`). Locally, ``<cache>/<digest>/`` holds a downloaded copy (placed by
one rename, so it is absent or complete), and ``<cache>/staging/`` the registrations in progress.

Credentials come from the usual environment (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible servers), read by fsspec's
filesystem for the URL's protocol (``s3fs`` for ``s3://``, installed by ``loraplex[s3]``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import DIGEST
from .manifests import RemoteManifests
from .staging import StagingArea

COMPLETE = ".complete"


class RemoteBlobStore:
    def __init__(self, url: str, cache: Path) -> None:
        try:
            import fsspec
        except ImportError as exc:
            raise ValueError(f"--blobs {url} needs fsspec: pip install 'loraplex[s3]'") from exc
        try:
            self._fs, self._root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"--blobs {url}: {exc}") from exc
        self._root = self._root.rstrip("/")
        self.url = url
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        self._staging = StagingArea(cache / "staging")
        self._fs.makedirs(self._root, exist_ok=True)
        self.manifests = RemoteManifests(self._fs, f"{self._root}/manifests")

    @property
    def staging(self) -> StagingArea:
        return self._staging

    def _remote(self, digest: str, name: str = "") -> str:
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return f"{self._root}/{digest}" + (f"/{name}" if name else "")

    def path(self, digest: str) -> Path:
        """Where the blob is (or will be) cached on this machine; see :meth:`local`."""
        self._remote(digest)
        return self.cache / digest

    def local(self, digest: str) -> Path:
        """The blob's files on this machine, downloaded once if this machine has no copy yet."""
        target = self.path(digest)
        if target.is_dir():
            return target
        if not self._fs.exists(self._remote(digest, COMPLETE)):
            raise FileNotFoundError(f"blob {digest} is missing from {self.url}")
        with self._staging.new() as tmp:
            for remote in self._fs.ls(self._remote(digest), detail=False):
                name = remote.rstrip("/").rsplit("/", 1)[-1]
                if name != COMPLETE:
                    self._fs.get_file(remote, str(tmp / name))
            try:
                os.rename(tmp, target)
            except OSError:  # another thread cached it meanwhile
                if not target.is_dir():
                    raise
        return target

    def place(self, staged: Path, digest: str) -> bool:
        """Upload ``staged`` as blob ``digest`` (then cache it locally); ``False`` if it existed.
        Callers serialise this with :meth:`remove` (under the registry's write lock)."""
        if self._fs.exists(self._remote(digest, COMPLETE)):
            return False
        self._fs.makedirs(self._remote(digest), exist_ok=True)  # a no-op on object stores
        for file in sorted(staged.iterdir()):
            self._fs.put_file(str(file), self._remote(digest, file.name))
        self._fs.pipe_file(self._remote(digest, COMPLETE), b"")
        if not self.path(digest).exists():
            os.rename(staged, self.path(digest))
        return True

    def remove(self, digest: str) -> None:
        if self._fs.exists(self._remote(digest)):
            self._fs.rm(self._remote(digest), recursive=True)
        self._staging.discard(self.path(digest))

    def digests(self) -> set[str]:
        """Every blob under the URL, finished or not."""
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self._root, detail=False))
        return {name for name in names if DIGEST.fullmatch(name)}
