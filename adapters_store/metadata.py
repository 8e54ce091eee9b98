"""The interface between the store and a metadata backend (SQLite, or PostgreSQL for a shared registry).

The store never writes SQL; it opens a transaction and calls these methods. Rows travel as
plain dicts whose keys are the column names below, with ``metadata``/``defaults`` as dicts
(the backend chooses how to persist JSON).

Adapter row: ``name, version, kind, digest, size_bytes, created_at, metadata``.
Endpoint row: ``name, adapter_name, adapter_version, soft_prompt_name, soft_prompt_version,
canary_name, canary_version, canary_weight, template, system_message, defaults,
max_new_tokens_cap, created_at, updated_at``.
Journal row (:mod:`.journal`): ``entry, op_id, op, name, version, digest, created_at``.
Idempotency row: ``idempotency_key, name, version, digest, created_at``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

Row = dict[str, Any]


class MetadataTx(Protocol):
    def allocate_version(self, name: str) -> int:
        """The next version of ``name``; versions are never reused, even after a delete."""

    def insert_adapter(self, row: Row) -> None: ...

    def restore_adapter(self, row: Row) -> None:
        """Insert a version re-created from its manifest, keeping its number."""

    def raise_last_version(self, name: str, version: int) -> None:
        """Make sure ``name``'s next version is above ``version``."""

    def last_versions(self) -> dict[str, int]: ...

    def get_adapter(self, name: str, version: int | None) -> Row | None:
        """``version=None``: the latest version."""

    def list_adapters(self, name: str | None = None) -> list[Row]:
        """By name, then version."""

    def list_adapters_after(self, after: tuple[str, int] | None, limit: int) -> list[Row]:
        """A page of versions following ``(name, version)``, by name then version."""

    def delete_adapters(self, name: str, version: int | None) -> None:
        """``version=None``: every version of ``name``."""

    def digest_in_use(self, digest: str) -> bool: ...

    def endpoints_using(self, name: str, version: int | None) -> list[tuple[str, str]]:
        """``(endpoint, field)`` for every reference to ``name`` (at ``version`` if given)."""

    def insert_endpoint(self, row: Row) -> None: ...

    def update_endpoint(self, row: Row) -> None: ...

    def get_endpoint(self, name: str) -> Row | None: ...

    def list_endpoints(self) -> list[Row]: ...

    def list_endpoints_after(self, after: str | None, limit: int) -> list[Row]:
        """A page of endpoints named after ``after``, by name."""

    def delete_endpoint(self, name: str) -> None: ...

    def idempotent_result(self, key: str) -> Row | None:
        """``name, version, digest, created_at`` of the registration made under ``key``."""

    def remember_idempotent(self, key: str, name: str, version: int, digest: str, now: float, keep: float) -> None:
        """Record what ``key`` registered; forget keys older than ``keep`` seconds."""

    def insert_journal(self, entries: list[Row]) -> None: ...

    def journal_entries(self, op_id: str | None = None) -> list[Row]:
        """One operation's entries, or every entry."""

    def delete_journal(self, op_ids: set[str]) -> None: ...


class Metadata(Protocol):
    def write(self) -> AbstractContextManager[MetadataTx]:
        """A transaction that excludes every other writer, of any process, until it ends;
        committed on normal exit, rolled back on an exception."""

    def read(self) -> AbstractContextManager[MetadataTx]:
        """A consistent snapshot for reads."""

    def close(self) -> None: ...
