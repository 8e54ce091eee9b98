"""Numbered schema migrations, applied when a store is opened, under the writers' lock.

Why: the schema version used to be one fixed string checked for equality, so any new table
would have made every existing store refuse to open, and the coming features (structured
output, rollouts, tenants) all add tables or columns. Now ``store_meta.schema_version`` holds
the number of the last migration applied, and opening a store applies the missing ones in
order.

What was decided:

- Migration 1 is, verbatim, the schema every release before migrations wrote (and its
  ``schema_version`` was ``"1"``), so those stores are at version 1 and only take what follows.
- Each migration runs in the writers' transaction that also records its number, so it is
  applied once or not at all, on SQLite and PostgreSQL alike (both run DDL transactionally),
  and replicas opening a shared registry at once apply it once. Each statement is idempotent
  as well (``IF NOT EXISTS``), so replaying one is harmless.
- A store whose version is above :data:`LATEST` was written by a newer loraplex and is refused,
  never downgraded.
- To change the schema, append a :class:`Migration` with the next number; never edit one that
  has been released. The statements are plain SQL both backends accept (see :mod:`.sql_tx`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .errors import StoreError


class MigrationTx(Protocol):
    def run(self, statement: str) -> None: ...

    def schema_version(self) -> int: ...

    def set_meta(self, key: str, value: str) -> None: ...


@dataclass(frozen=True)
class Migration:
    number: int
    what: str
    statements: tuple[str, ...]


MIGRATIONS = (
    Migration(1, "adapter versions, version counters, endpoints", (
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
    )),
    Migration(2, "the journal of interrupted publishes and deletes (see journal.py)", (
        """CREATE TABLE IF NOT EXISTS journal (
            entry TEXT PRIMARY KEY,
            op_id TEXT NOT NULL,
            op TEXT NOT NULL,
            name TEXT NOT NULL,
            version BIGINT NOT NULL,
            digest TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS journal_by_op ON journal (op_id)",
    )),
    Migration(3, "idempotency keys of registrations, so a retried register or upload returns the first result", (
        """CREATE TABLE IF NOT EXISTS idempotency_keys (
            idempotency_key TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            version BIGINT NOT NULL,
            digest TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (created_at)",
    )),
)
LATEST = MIGRATIONS[-1].number


def migrate(tx: MigrationTx, where: str) -> list[int]:
    """Apply every migration the store lacks, in order; return their numbers. Run it inside a
    write transaction: its effects and the new version commit together."""
    found = tx.schema_version()
    if found > LATEST:
        raise StoreError("failed_precondition", f"{where} has schema version {found}, written by a newer "
                                                f"loraplex; this one knows versions up to {LATEST}: upgrade loraplex")
    applied = []
    for migration in MIGRATIONS[found:]:
        for statement in migration.statements:
            tx.run(statement)
        tx.set_meta("schema_version", str(migration.number))
        applied.append(migration.number)
    return applied
