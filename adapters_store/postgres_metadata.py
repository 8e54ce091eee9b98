"""Registry metadata in PostgreSQL, so several replicas share one registry (`--store postgresql://...`).

The statements are :mod:`.sql_tx`'s, the schema (:mod:`.migrations`) is the same as SQLite's.
What is PostgreSQL-only is here:

- writers of every replica are serialised by one transaction-scoped advisory lock (the
  counterpart of SQLite's ``BEGIN IMMEDIATE``), so version allocation, blob placement and the
  "is this digest still used?" check on delete stay atomic across machines;
- reads run in a REPEATABLE READ snapshot;
- opening inspects the database (with a :class:`~.guard.Guard`) and migrates it in one
  transaction under that lock, so a refused open creates nothing and replicas starting together
  migrate once;
- a lost connection (a database restart, a network blip) is re-opened at the next
  transaction; while the database is unreachable the store raises ``StoreError("unavailable")``,
  which the server answers with UNAVAILABLE, and everything else keeps serving.

Thread safety: as for SQLite, one connection guarded by one lock held for each transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import StoreError
from .guard import Guard
from .migrations import migrate as apply_migrations
from .sql_tx import SqlTx

# The advisory lock every writer takes: an arbitrary fixed 64-bit key ("loraplex" in ASCII).
WRITE_LOCK_KEY = 0x6C6F7261706C6578
CONNECT_TIMEOUT_S = 10


def is_postgres_url(store: str) -> bool:
    return store.startswith(("postgresql://", "postgres://"))


class PostgresTx(SqlTx):
    """The shared queries on one psycopg connection, inside one transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def _exec(self, sql: str, params: tuple = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)

    def tables(self) -> set[str]:
        cur = self._exec("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
        return {r[0] for r in cur}


class PostgresMetadata:
    def __init__(self, dsn: str, guard: Guard | None = None, migrate: bool = True) -> None:
        """``guard``: refuse a database without the registry while blobs exist (see :mod:`.guard`);
        ``migrate=False`` reads the database as found (``loraplex store verify``)."""
        try:
            import psycopg
        except ImportError as exc:
            raise StoreError("failed_precondition", "--store postgresql://... needs psycopg: pip install "
                             "'loraplex[postgres]'") from exc
        self._psycopg = psycopg
        self._dsn = dsn
        self._lock = threading.Lock()
        self._conn: Any = None
        self._closed = False
        try:
            with self.write() if migrate else self.read() as tx:
                if guard is not None:
                    guard.check_registry(f"the registry database {self.where}", tx.inspect())
                if migrate:
                    apply_migrations(tx, f"the registry database {self.where}")
        except psycopg.DatabaseError as exc:
            self.close()
            raise StoreError("failed_precondition", f"the registry database {self.where} cannot be read: "
                                                    f"{str(exc).strip()}") from None
        except BaseException:
            self.close()
            raise

    @property
    def where(self) -> str:
        """The database, for messages: host, port and name, never the password."""
        try:
            info = self._psycopg.conninfo.conninfo_to_dict(self._dsn)
        except self._psycopg.Error:
            return "postgresql://<unparsable>"
        return f"postgresql://{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    @contextmanager
    def write(self) -> Iterator[PostgresTx]:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
            yield PostgresTx(conn)

    @contextmanager
    def read(self) -> Iterator[PostgresTx]:
        with self._transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield PostgresTx(conn)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        psycopg = self._psycopg
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    yield conn
            except psycopg.OperationalError as exc:
                raise StoreError("unavailable", f"the registry database {self.where} failed: "
                                                f"{str(exc).strip()}") from None

    def _connection(self) -> Any:
        if self._closed:
            raise StoreError("failed_precondition", "the adapter store is closed")
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            self._conn.close()
        try:
            self._conn = self._psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                               application_name="loraplex")
        except self._psycopg.OperationalError as exc:
            self._conn = None
            raise StoreError("unavailable", f"cannot reach the registry database {self.where}: "
                                            f"{str(exc).strip()}") from None
        return self._conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
