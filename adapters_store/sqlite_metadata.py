"""Registry metadata in one SQLite file (the default store). The statements live in
:mod:`.sql_tx` and the schema in :mod:`.migrations`; what is SQLite-only is here: the checks of
the file before SQLite opens it (:func:`probe_file`), WAL and ``foreign_keys``, the catalogue
query, and ``BEGIN IMMEDIATE``.

Opening, in order: the file is probed (missing, empty, not a database); with a
:class:`~.guard.Guard` the registry is inspected inside ``BEGIN IMMEDIATE`` before SQLite's
settings are written (switching a file to WAL changes it); then migrations run. A refusal at
any of these steps leaves the file as it was.

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
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .guard import Guard
from .migrations import migrate as apply_migrations
from .sql_tx import SqlTx

_HEADER = b"SQLite format 3\x00"


class SqliteTx(SqlTx):
    """The shared queries on one SQLite connection, inside one transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _exec(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def tables(self) -> set[str]:
        return {r[0] for r in self._exec("SELECT name FROM sqlite_master WHERE type = 'table'")}


@dataclass(frozen=True)
class FileProblem:
    text: str  # completes "registry.sqlite3 ..."
    unreadable: bool  # True: never open it; False: missing or empty, a fresh registry may be created


def probe_file(path: Path) -> FileProblem | None:
    """Why ``path`` does not hold a SQLite database, without creating or changing anything."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_HEADER))
    except FileNotFoundError:
        return FileProblem("is missing", unreadable=False)
    except OSError as exc:
        return FileProblem(f"cannot be read ({exc.strerror})", unreadable=True)
    if not head:
        return FileProblem("is empty (0 bytes)", unreadable=False)
    if head != _HEADER:
        return FileProblem("is not a SQLite database", unreadable=True)
    return None


class SqliteMetadata:
    def __init__(self, path: Path, guard: Guard | None = None, migrate: bool = True) -> None:
        """``guard``: refuse a file that does not hold the registry while blobs exist (see
        :mod:`.guard`). ``migrate=False`` reads the file as found (``loraplex store verify``)
        and never creates it."""
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.where = f"registry database {path}"
        problem = probe_file(path)
        if problem is not None and guard is not None:
            guard.check_file(path.name, problem.text, problem.unreadable)
        elif problem is not None and (problem.unreadable or not migrate):
            raise StoreError("failed_precondition", f"{self.where} {problem.text}")
        try:
            self._open(path, guard, migrate)
        except sqlite3.DatabaseError as exc:
            self.close()
            if guard is not None:
                guard.check_file(path.name, f"cannot be read ({exc})", unreadable=True)
            raise StoreError("failed_precondition", f"{self.where} cannot be read ({exc})") from None
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path, guard: Guard | None, migrate: bool) -> None:
        self._conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        _check_pages(self._conn)
        if guard is not None:
            with self.write() as tx:
                guard.check_registry(path.name, tx.inspect())
        _configure(self._conn, path)
        if migrate:
            with self.write() as tx:
                apply_migrations(tx, self.where)

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
            try:
                conn.execute(begin)
                try:
                    yield SqliteTx(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as exc:
                if type(exc) is not sqlite3.DatabaseError:  # a constraint or a lock, not a damaged file
                    raise
                raise StoreError("unavailable", f"{self.where} is damaged ({exc}); restore it from a backup, or "
                                                "move it aside and run `loraplex store rebuild`") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _check_pages(conn: sqlite3.Connection) -> None:
    """Raise sqlite3.DatabaseError unless SQLite's own page check passes. A file whose header and
    schema read fine can still have a damaged table, which the first query at start-up would hit
    deep inside recovery; checked here, it is refused like any unreadable file (the registry is
    small: the check reads it once)."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"damaged: {'; '.join(problems)}")


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError("failed_precondition", f"cannot put {path} in WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
