"""Every SQL query the store runs, shared by the SQLite and PostgreSQL backends (the schema
itself is built by :mod:`.migrations`).

The statements are plain parameterised SQL that both accept, written with ``?`` placeholders;
a backend supplies :meth:`SqlTx._exec` (PostgreSQL's rewrites ``?`` to ``%s``) and
:meth:`SqlTx.tables` (each has its own catalogue). JSON columns (``metadata``, ``defaults``)
are stored as text, so both backends share one schema.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import StoreError
from .guard import RegistryState
from .metadata import Row

_ADAPTER_COLUMNS = "name, version, kind, digest, size_bytes, created_at, metadata"
_JOURNAL_COLUMNS = "entry, op_id, op, name, version, digest, created_at"
_JOURNAL_FIELDS = tuple(c.strip() for c in _JOURNAL_COLUMNS.split(","))
_ENDPOINT_COLUMNS = (
    "name, adapter_name, adapter_version, soft_prompt_name, soft_prompt_version, canary_name, canary_version, "
    "canary_weight, template, system_message, defaults, max_new_tokens_cap, created_at, updated_at"
)
_ENDPOINT_FIELDS = tuple(c.strip() for c in _ENDPOINT_COLUMNS.split(","))
_ENDPOINT_PLACEHOLDERS = ", ".join("?" for _ in _ENDPOINT_FIELDS)
_ENDPOINT_UPDATABLE = tuple(c for c in _ENDPOINT_FIELDS if c not in ("name", "created_at"))
_ENDPOINT_ASSIGNMENTS = ", ".join(f"{c} = ?" for c in _ENDPOINT_UPDATABLE)
_REFERENCES = (
    ("adapter", "adapter_name", "adapter_version"),
    ("soft_prompt", "soft_prompt_name", "soft_prompt_version"),
    ("canary_adapter", "canary_name", "canary_version"),
)


class SqlTx:
    """The queries, run inside one transaction of a metadata backend."""

    def _exec(self, sql: str, params: tuple = ()) -> Any:
        """Run one statement; returns a cursor (``fetchone``/``fetchall``/iteration)."""
        raise NotImplementedError

    def tables(self) -> set[str]:
        """The names of the tables in the database."""
        raise NotImplementedError

    def run(self, statement: str) -> None:
        """Run one statement without parameters (a migration's)."""
        self._exec(statement)

    def get_meta(self, key: str) -> str | None:
        found = self._exec("SELECT value FROM store_meta WHERE key = ?", (key,)).fetchone()
        return None if found is None else str(found[0])

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT INTO store_meta (key, value) VALUES (?, ?) "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def schema_version(self) -> int:
        """The number of the last migration applied; 0 for a database without the registry's tables."""
        if "store_meta" not in self.tables():
            return 0
        found = self.get_meta("schema_version")
        if found is None or not found.isdigit():
            raise StoreError("failed_precondition", f"the registry's schema_version is {found!r}, not a migration "
                                                    "number; restore the database from a backup")
        return int(found)

    def inspect(self) -> RegistryState:
        """What the database holds, read before anything is created (see :mod:`.guard`)."""
        tables = self.tables()
        registrations = 0
        if "adapter_names" in tables:
            (registrations,) = self._exec("SELECT COUNT(*) FROM adapter_names").fetchone()
        journaled = {r[0] for r in self._exec("SELECT digest FROM journal")} if "journal" in tables else set()
        return RegistryState(has_tables="adapters" in tables, registrations=int(registrations),
                             journaled=frozenset(journaled))

    def allocate_version(self, name: str) -> int:
        self._exec(
            "INSERT INTO adapter_names (name, last_version) VALUES (?, 0) ON CONFLICT (name) DO NOTHING", (name,)
        )
        self._exec("UPDATE adapter_names SET last_version = last_version + 1 WHERE name = ?", (name,))
        (version,) = self._exec("SELECT last_version FROM adapter_names WHERE name = ?", (name,)).fetchone()
        return int(version)

    def insert_adapter(self, row: Row) -> None:
        self._exec(
            f"INSERT INTO adapters ({_ADAPTER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row["name"], row["version"], row["kind"], row["digest"], row["size_bytes"], row["created_at"],
             json.dumps(row["metadata"], sort_keys=True)),
        )

    def get_adapter(self, name: str, version: int | None) -> Row | None:
        if version is None:
            cur = self._exec(
                f"SELECT {_ADAPTER_COLUMNS} FROM adapters WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            )
        else:
            cur = self._exec(
                f"SELECT {_ADAPTER_COLUMNS} FROM adapters WHERE name = ? AND version = ?", (name, version)
            )
        found = cur.fetchone()
        return None if found is None else _adapter_row(found)

    def list_adapters(self, name: str | None = None) -> list[Row]:
        if name is None:
            cur = self._exec(f"SELECT {_ADAPTER_COLUMNS} FROM adapters ORDER BY name, version")
        else:
            cur = self._exec(
                f"SELECT {_ADAPTER_COLUMNS} FROM adapters WHERE name = ? ORDER BY version", (name,)
            )
        return [_adapter_row(r) for r in cur.fetchall()]

    def list_adapters_after(self, after: tuple[str, int] | None, limit: int) -> list[Row]:
        """Up to ``limit`` versions following ``(name, version)`` (from the first when None), by name, then version."""
        if after is None:
            cur = self._exec(f"SELECT {_ADAPTER_COLUMNS} FROM adapters ORDER BY name, version LIMIT ?", (limit,))
        else:
            cur = self._exec(
                f"SELECT {_ADAPTER_COLUMNS} FROM adapters WHERE name > ? OR (name = ? AND version > ?) "
                "ORDER BY name, version LIMIT ?", (after[0], after[0], after[1], limit))
        return [_adapter_row(r) for r in cur.fetchall()]

    def delete_adapters(self, name: str, version: int | None) -> None:
        if version is None:
            self._exec("DELETE FROM adapters WHERE name = ?", (name,))
        else:
            self._exec("DELETE FROM adapters WHERE name = ? AND version = ?", (name, version))

    def restore_adapter(self, row: Row) -> None:
        """Insert a version re-created from its manifest (see :mod:`.rebuild`), keeping its number."""
        self.raise_last_version(row["name"], row["version"])
        self.insert_adapter(row)

    def raise_last_version(self, name: str, version: int) -> None:
        """Make sure ``name``'s next version is above ``version``."""
        self._exec(
            "INSERT INTO adapter_names (name, last_version) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
            "last_version = CASE WHEN adapter_names.last_version < excluded.last_version "
            "THEN excluded.last_version ELSE adapter_names.last_version END",
            (name, version),
        )

    def last_versions(self) -> dict[str, int]:
        return {name: int(v) for name, v in self._exec("SELECT name, last_version FROM adapter_names")}

    def digest_in_use(self, digest: str) -> bool:
        return self._exec("SELECT 1 FROM adapters WHERE digest = ? LIMIT 1", (digest,)).fetchone() is not None

    def endpoints_using(self, name: str, version: int | None) -> list[tuple[str, str]]:
        cur = self._exec(
            f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints "
            "WHERE adapter_name = ? OR soft_prompt_name = ? OR canary_name = ? ORDER BY name",
            (name, name, name),
        )
        users = []
        for row in (_endpoint_row(r) for r in cur.fetchall()):
            for field, name_col, version_col in _REFERENCES:
                if row[name_col] == name and version in (None, row[version_col]):
                    users.append((row["name"], field))
        return users

    def insert_endpoint(self, row: Row) -> None:
        self._exec(
            f"INSERT INTO endpoints ({_ENDPOINT_COLUMNS}) VALUES ({_ENDPOINT_PLACEHOLDERS})",
            tuple(_endpoint_value(row, c) for c in _ENDPOINT_FIELDS),
        )

    def update_endpoint(self, row: Row) -> None:
        self._exec(
            f"UPDATE endpoints SET {_ENDPOINT_ASSIGNMENTS} WHERE name = ?",
            (*(_endpoint_value(row, c) for c in _ENDPOINT_UPDATABLE), row["name"]),
        )

    def get_endpoint(self, name: str) -> Row | None:
        found = self._exec(f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints WHERE name = ?", (name,)).fetchone()
        return None if found is None else _endpoint_row(found)

    def list_endpoints(self) -> list[Row]:
        cur = self._exec(f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints ORDER BY name")
        return [_endpoint_row(r) for r in cur.fetchall()]

    def list_endpoints_after(self, after: str | None, limit: int) -> list[Row]:
        """Up to ``limit`` endpoints named after ``after`` (from the first when None), by name."""
        if after is None:
            cur = self._exec(f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints ORDER BY name LIMIT ?", (limit,))
        else:
            cur = self._exec(f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints WHERE name > ? ORDER BY name LIMIT ?",
                             (after, limit))
        return [_endpoint_row(r) for r in cur.fetchall()]

    def delete_endpoint(self, name: str) -> None:
        self._exec("DELETE FROM endpoints WHERE name = ?", (name,))

    def idempotent_result(self, key: str) -> Row | None:
        """What the registration made under idempotency ``key``: ``name, version, digest, created_at``."""
        found = self._exec("SELECT name, version, digest, created_at FROM idempotency_keys WHERE idempotency_key = ?",
                           (key,)).fetchone()
        if found is None:
            return None
        name, version, digest, created_at = found
        return {"name": name, "version": int(version), "digest": digest, "created_at": float(created_at)}

    def remember_idempotent(self, key: str, name: str, version: int, digest: str, now: float, keep: float) -> None:
        """Record what ``key`` registered, forgetting keys older than ``keep`` seconds."""
        self._exec("DELETE FROM idempotency_keys WHERE created_at < ?", (now - keep,))
        self._exec("INSERT INTO idempotency_keys (idempotency_key, name, version, digest, created_at) "
                   "VALUES (?, ?, ?, ?, ?)", (key, name, version, digest, now))

    def insert_journal(self, entries: list[Row]) -> None:
        for e in entries:
            self._exec(f"INSERT INTO journal ({_JOURNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (e["entry"], e["op_id"], e["op"], e["name"], e["version"], e["digest"], e["created_at"]))

    def journal_entries(self, op_id: str | None = None) -> list[Row]:
        """Entries of one operation, or all of them (none in a database older than the journal)."""
        if op_id is not None:
            cur = self._exec(f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE op_id = ? ORDER BY entry", (op_id,))
        elif "journal" in self.tables():
            cur = self._exec(f"SELECT {_JOURNAL_COLUMNS} FROM journal ORDER BY created_at, entry")
        else:
            return []
        return [_journal_row(r) for r in cur.fetchall()]

    def delete_journal(self, op_ids: set[str]) -> None:
        for op_id in sorted(op_ids):
            self._exec("DELETE FROM journal WHERE op_id = ?", (op_id,))


def _adapter_row(values: tuple[Any, ...]) -> Row:
    name, version, kind, digest, size_bytes, created_at, metadata = values
    return {"name": name, "version": int(version), "kind": kind, "digest": digest, "size_bytes": int(size_bytes),
            "created_at": float(created_at), "metadata": json.loads(metadata)}


def _journal_row(values: tuple[Any, ...]) -> Row:
    row = dict(zip(_JOURNAL_FIELDS, values))
    row["version"], row["created_at"] = int(row["version"]), float(row["created_at"])
    return row


def _endpoint_row(values: tuple[Any, ...]) -> Row:
    row = dict(zip(_ENDPOINT_FIELDS, values))
    row["defaults"] = json.loads(row["defaults"])
    return row


def _endpoint_value(row: Row, column: str) -> Any:
    return json.dumps(row[column], sort_keys=True) if column == "defaults" else row[column]
