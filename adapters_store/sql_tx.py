"""Every SQL statement the store runs, shared by the SQLite and PostgreSQL backends.

The statements are plain parameterised SQL that both accept, written with ``?`` placeholders;
a backend supplies :meth:`SqlTx._exec` (PostgreSQL's rewrites ``?`` to ``%s``). JSON columns
(``metadata``, ``defaults``) are stored as text, so both backends share one schema.
"""

from __future__ import annotations

import json
from typing import Any

from .metadata import Row

SCHEMA_VERSION = "1"

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS store_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS adapter_names (
        name TEXT PRIMARY KEY,
        last_version BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS adapters (
        name TEXT NOT NULL REFERENCES adapter_names (name),
        version BIGINT NOT NULL,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        metadata TEXT NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    "CREATE INDEX IF NOT EXISTS adapters_by_digest ON adapters (digest)",
    """CREATE TABLE IF NOT EXISTS endpoints (
        name TEXT PRIMARY KEY,
        adapter_name TEXT,
        adapter_version BIGINT,
        soft_prompt_name TEXT,
        soft_prompt_version BIGINT,
        canary_name TEXT,
        canary_version BIGINT,
        canary_weight DOUBLE PRECISION NOT NULL,
        template TEXT NOT NULL,
        system_message TEXT NOT NULL,
        defaults TEXT NOT NULL,
        max_new_tokens_cap BIGINT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        FOREIGN KEY (adapter_name, adapter_version) REFERENCES adapters (name, version),
        FOREIGN KEY (soft_prompt_name, soft_prompt_version) REFERENCES adapters (name, version),
        FOREIGN KEY (canary_name, canary_version) REFERENCES adapters (name, version)
    )""",
)

_ADAPTER_COLUMNS = "name, version, kind, digest, size_bytes, created_at, metadata"
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

    def ensure_schema(self) -> str:
        """Create missing tables; return the schema version the file was written with."""
        for statement in SCHEMA:
            self._exec(statement)
        self._exec(
            "INSERT INTO store_meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
            (SCHEMA_VERSION,),
        )
        (found,) = self._exec("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()
        return str(found)

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

    def delete_adapters(self, name: str, version: int | None) -> None:
        if version is None:
            self._exec("DELETE FROM adapters WHERE name = ?", (name,))
        else:
            self._exec("DELETE FROM adapters WHERE name = ? AND version = ?", (name, version))

    def digest_in_use(self, digest: str) -> bool:
        return self._exec("SELECT 1 FROM adapters WHERE digest = ? LIMIT 1", (digest,)).fetchone() is not None

    def all_digests(self) -> set[str]:
        return {r[0] for r in self._exec("SELECT DISTINCT digest FROM adapters")}

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

    def delete_endpoint(self, name: str) -> None:
        self._exec("DELETE FROM endpoints WHERE name = ?", (name,))



def _adapter_row(values: tuple[Any, ...]) -> Row:
    name, version, kind, digest, size_bytes, created_at, metadata = values
    return {"name": name, "version": int(version), "kind": kind, "digest": digest, "size_bytes": int(size_bytes),
            "created_at": float(created_at), "metadata": json.loads(metadata)}


def _endpoint_row(values: tuple[Any, ...]) -> Row:
    row = dict(zip(_ENDPOINT_FIELDS, values))
    row["defaults"] = json.loads(row["defaults"])
    return row


def _endpoint_value(row: Row, column: str) -> Any:
    return json.dumps(row[column], sort_keys=True) if column == "defaults" else row[column]
