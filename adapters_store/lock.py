"""Who else has this store open: an advisory ``flock`` on ``<store>/store.lock``.

Every open store holds the lock shared. Crash recovery (clearing staging, removing orphan
blobs) is only safe when nobody else is mid-registration, so it runs only when the lock can
be taken exclusively, i.e. when no other process or store object has the directory open.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StoreLock:
    def __init__(self, path: Path) -> None:
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_exclusive(self) -> bool:
        try:
            fcntl.flock(self._require(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def share(self) -> None:
        """Hold the lock shared (waiting for an exclusive holder to finish its recovery)."""
        fcntl.flock(self._require(), fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _require(self) -> int:
        if self._fd is None:
            raise RuntimeError("the store lock was released")
        return self._fd
