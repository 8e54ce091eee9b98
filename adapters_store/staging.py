"""Scratch directories beside the blobs, so a finished adapter is published by one rename.

Anything in the staging area belongs to a registration in progress (or to a blob being
removed); when the store is opened with nobody else using it, whatever is left there can only
come from a crash and is cleared.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StagingArea:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def new(self) -> Iterator[Path]:
        """A fresh empty directory, removed on exit whatever happens (if still there)."""
        path = Path(tempfile.mkdtemp(prefix="stage-", dir=self.root))
        try:
            yield path
        finally:
            _remove_tree(path)

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is a directory directly inside the staging area."""
        return path.parent.resolve() == self.root.resolve() and path.is_dir() and not path.is_symlink()

    def discard(self, path: Path) -> None:
        """Remove a directory elsewhere on this filesystem as if atomically.

        It is first renamed into the staging area, so a crash halfway through the deletion
        leaves no half-deleted directory under its old name.
        """
        doomed = self.root / f"trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        _remove_tree(doomed)

    def clear(self) -> list[str]:
        """Remove everything in the staging area; return what was removed."""
        removed = sorted(os.listdir(self.root))
        for name in removed:
            _remove_tree(self.root / name)
        return removed


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
