"""Registry metadata in one SQLite file (the default store). The statements live in
:mod:`.sql_tx`; what is SQLite-only is here: :func:`_connect` (WAL, ``foreign_keys``) and
``BEGIN IMMEDIATE``.

Thread safety: one connection shared by all threads and guarded by one lock, held for each
whole transaction. Statements are short (no I/O on adapter files happens inside except one
rename at publish), so serialising them costs little and keeps transactions simple. Other
processes are excluded by SQLite's own write lock (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StoreError
from .sql_tx import SCHEMA_VERSION, SqlTx


class SqliteTx(SqlTx):
    """The shared queries on one SQLite connection, inside one transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _exec(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)


class SqliteMetadata:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = _connect(path)
        with self.write() as tx:
            found = tx.ensure_schema()
        if found != SCHEMA_VERSION:
            self.close()
            raise StoreError(
                "failed_precondition",
                f"store {path} has schema version {found}; this loraplex reads version {SCHEMA_VERSION}",
            )

    @contextmanager
    def write(self) -> Iterator[SqliteTx]:
        with self._transaction("BEGIN IMMEDIATE") as tx:
            yield tx

    @contextmanager
    def read(self) -> Iterator[SqliteTx]:
        with self._transaction("BEGIN") as tx:
            yield tx

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[SqliteTx]:
        with self._lock:
            if self._conn is None:
                raise StoreError("failed_precondition", "the adapter store is closed")
            conn = self._conn
            conn.execute(begin)
            try:
                yield SqliteTx(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError("failed_precondition", f"cannot put {path} in WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn
