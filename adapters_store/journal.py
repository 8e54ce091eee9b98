"""The journal of interrupted operations: the only licence to remove an adapter blob.

Why: recovery used to remove every blob no row named, so a database that was lost, emptied or
mistyped made the server delete every adapter file. The rule now (DESIGN.md): the server never
deletes an adapter file because the database does not know it; only a journal of an interrupted
operation licenses removal. A blob that no row and no journal entry names is kept and reported
(``loraplex store verify``).

The journal is a table in the registry database (migration 2), so a new or empty database has
no journal and licenses nothing, and SQLite and PostgreSQL share it. Each entry names one
operation (``op_id``), its kind, an adapter name and version, and a blob digest:

- publish: one entry (version 0: not allocated yet), committed *before* the blob is placed;
  placing the blob, allocating the version and inserting the row then commit together;
- delete: one entry per deleted version, committed in the transaction that deletes the rows.

Settling an operation's entries is one function, run under the writers' lock right after the
operation (whether it succeeded or raised) and, after a crash, by the next open:

- publish: each row of that name using the digest gets its manifest if it has none (a commit
  whose manifest was not written yet);
- delete: a deleted version's live manifest becomes a tombstone;
- then the digest's blob is removed if no row names it *and* no live manifest names it. A
  manifest is only written after a commit, so a live one means the blob belongs to a committed
  version even where this database lacks the row (say, restored from a backup older than the
  blobs); such a blob is kept for ``loraplex store rebuild`` to restore.

Entries are dropped once settled: by the operation itself, by an open that is the store's sole
user, and on a shared registry by any replica's open once older than :data:`STALE_AFTER_S` (a
younger one may belong to an operation in flight on another replica: settling it early is
harmless, but dropping it would leave that operation unlicensed if it then crashed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Protocol

from .manifests import BlobArea, record_missing, scan
from .metadata import MetadataTx, Row

PUBLISH, DELETE = "publish", "delete"
STALE_AFTER_S = 3600.0


class Blobs(BlobArea, Protocol):
    def digests(self) -> set[str]: ...

    def remove(self, digest: str) -> None: ...


def new_op() -> str:
    return uuid.uuid4().hex


def publish_entry(op_id: str, name: str, digest: str) -> list[Row]:
    return [_entry(op_id, PUBLISH, name, 0, digest)]


def delete_entries(op_id: str, rows: Iterable[Row]) -> list[Row]:
    return [_entry(op_id, DELETE, row["name"], row["version"], row["digest"]) for row in rows]


def _entry(op_id: str, op: str, name: str, version: int, digest: str) -> Row:
    return {"entry": uuid.uuid4().hex, "op_id": op_id, "op": op, "name": name, "version": version,
            "digest": digest, "created_at": time.time()}


def settle(tx: MetadataTx, entries: list[Row], blobs: Blobs) -> list[str]:
    """Finish or undo what ``entries`` describe; return the digests of the blobs removed. Call it
    inside a write transaction; it does not drop the entries."""
    for entry in entries:
        if entry["op"] == PUBLISH:
            _record_committed(tx, entry, blobs)
        else:
            _tombstone(tx, entry, blobs)
    present = blobs.digests() if entries else set()
    removed = []
    for digest in sorted({e["digest"] for e in entries} & present):
        if not tx.digest_in_use(digest) and not _named_by_live_manifest(blobs, digest):
            blobs.remove(digest)
            removed.append(digest)
    return removed


def stale(entries: list[Row], sole_user: bool) -> set[str]:
    """The operations whose entries may be dropped after settling (see the module docstring)."""
    cutoff = time.time() - STALE_AFTER_S
    return {e["op_id"] for e in entries if sole_user or e["created_at"] < cutoff}


def _record_committed(tx: MetadataTx, entry: Row, blobs: Blobs) -> None:
    """Write the manifests a committed publish still lacks. One that cannot be written (its blob
    unreadable) is left to the next open, which writes every missing manifest or logs why not."""
    rows = [row for row in tx.list_adapters(entry["name"]) if row["digest"] == entry["digest"]]
    record_missing(blobs, rows, have={m.ref for m in scan(blobs.manifests, entry["digest"]).manifests})


def _tombstone(tx: MetadataTx, entry: Row, blobs: Blobs) -> None:
    if tx.get_adapter(entry["name"], entry["version"]) is not None:
        return
    for manifest in scan(blobs.manifests, entry["digest"]).manifests:
        if manifest.ref == (entry["name"], entry["version"]) and manifest.live:
            blobs.manifests.write(manifest.deleted(entry["created_at"]))


def _named_by_live_manifest(blobs: Blobs, digest: str) -> bool:
    """Whether a committed version (in any database) uses the blob; an unreadable manifest counts."""
    found = scan(blobs.manifests, digest)
    return bool(found.unreadable) or any(m.live for m in found.manifests)
