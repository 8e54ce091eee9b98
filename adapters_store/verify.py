"""``loraplex store verify``: compare a store's rows with its blobs and manifests, changing nothing.

It reads the database as found (no guard, no migration, no journal settling, nothing created:
a missing or empty database is reported, not made), lists the blobs and reads every manifest,
and reports what disagrees:

- rows without blobs: those versions cannot load;
- blobs without rows: each with the versions its live manifests name (``loraplex store
  rebuild`` restores those) or none (kept; nothing licenses removing them);
- rows without a manifest (the next open writes them) and live manifests without a row (rebuild
  restores them), and manifest files that cannot be parsed;
- journal entries not yet settled: an operation in flight, or interrupted (the next open
  settles it). What such an entry accounts for (the blob of a publish not yet committed, the row
  of one whose manifest is not written yet, the manifest of a deleted version not yet turned
  into a tombstone) is listed with it and does not make the store inconsistent: a backup taken
  while a publish was under way holds exactly that.

It does not re-hash blob contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .blobs import present_digests
from .errors import StoreError
from .manifests import LocalManifests, ManifestFiles, Scan, scan
from .metadata import Metadata, Row
from .postgres_metadata import PostgresMetadata, is_postgres_url
from .remote_blobs import RemoteBlobStore
from .sqlite_metadata import SqliteMetadata, probe_file


@dataclass
class VerifyReport:
    where: str
    database_problem: str | None = None
    rows: int = 0
    blobs: int = 0
    rows_without_blob: list[str] = field(default_factory=list)
    blobs_without_row: list[str] = field(default_factory=list)
    rows_without_manifest: list[str] = field(default_factory=list)
    manifests_without_row: list[str] = field(default_factory=list)
    unreadable_manifests: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not (self.database_problem or self.rows_without_blob or self.blobs_without_row
                    or self.rows_without_manifest or self.manifests_without_row or self.unreadable_manifests)

    def lines(self) -> list[str]:
        out = [f"adapter store {self.where}: {self.rows} registered version(s), {self.blobs} blob(s)"]
        if self.database_problem:
            out.append(f"database: {self.database_problem}")
        sections = (
            ("rows without blobs (cannot load)", self.rows_without_blob),
            ("blobs without rows", self.blobs_without_row),
            ("rows without a live manifest (the next open writes missing ones)", self.rows_without_manifest),
            ("manifests without a row (`loraplex store rebuild` restores them)", self.manifests_without_row),
            ("unreadable manifests", self.unreadable_manifests),
            ("journal entries not settled yet (the next open settles them)", self.pending),
        )
        for title, items in sections:
            if items:
                out.append(f"{title}: {len(items)}")
                out.extend(f"  {item}" for item in items)
        out.append("consistent" if self.consistent else "NOT consistent")
        return out


def verify(store: str, blobs: str | None = None, cache: Path | None = None) -> VerifyReport:
    """Look at the store named as ``loraplex serve`` names it (``--store``, ``--blobs``, ``--blob-cache``)."""
    present, files = _blob_side(store, blobs, cache)
    report = VerifyReport(where=store, blobs=len(present))
    rows, journal, report.database_problem = _database_side(store, blobs, report)
    _compare(report, rows, present, scan(files), journal)
    report.pending = [f"{e['op']} {e['name']}@{e['version'] or '?'} (blob {e['digest']})" for e in journal]
    return report


def _blob_side(store: str, blobs: str | None, cache: Path | None) -> tuple[set[str], ManifestFiles]:
    if is_postgres_url(store):
        if blobs is None:
            raise ValueError("--store postgresql://... needs --blobs: where the adapter files live")
        if "://" in blobs:
            remote = RemoteBlobStore(blobs, cache or Path.home() / ".cache/loraplex/blobs")
            return remote.digests(), remote.manifests
        return present_digests(Path(blobs) / "blobs"), LocalManifests(Path(blobs) / "manifests")
    if blobs is not None:
        raise ValueError("--blobs goes with --store postgresql://...; a store directory keeps its blobs inside")
    root = Path(store)
    if not root.is_dir():
        raise StoreError("not_found", f"no adapter store at {root} (not a directory)")
    return present_digests(root / "blobs"), LocalManifests(root / "manifests")


def _database_side(store: str, blobs: str | None, report: VerifyReport) -> tuple[list[Row], list[Row], str | None]:
    """The rows and journal entries, or why the database holds none; names the store in ``report``."""
    if is_postgres_url(store):
        metadata = PostgresMetadata(store, migrate=False)
        report.where = f"{metadata.where} (blobs in {blobs})"  # never the URL: it may hold a password
        return _read(metadata)
    database = Path(store) / "registry.sqlite3"
    problem = probe_file(database)
    if problem is not None:
        return [], [], f"{database.name} {problem.text}"
    try:
        metadata = SqliteMetadata(database, migrate=False)
    except StoreError as exc:
        return [], [], exc.message
    return _read(metadata)


def _read(metadata: Metadata) -> tuple[list[Row], list[Row], str | None]:
    try:
        with metadata.read() as tx:
            if "adapters" not in tx.tables():
                return [], [], "holds no registry tables"
            return tx.list_adapters(), tx.journal_entries(), None
    finally:
        metadata.close()


def _compare(report: VerifyReport, rows: list[Row], present: set[str], manifests: Scan, journal: list[Row]) -> None:
    report.rows = len(rows)
    refs = {(row["name"], row["version"]) for row in rows}
    live = [m for m in manifests.manifests if m.live]
    live_refs = {m.ref for m in live}
    tombstoned = {m.ref for m in manifests.manifests} - live_refs
    referenced = {row["digest"] for row in rows}
    publishing = {(e["name"], e["digest"]) for e in journal if e["op"] == "publish"}
    deleting = {(e["name"], e["version"]) for e in journal if e["op"] == "delete"}
    report.rows_without_blob = [f"{r['name']}@{r['version']} (blob {r['digest']})" for r in rows
                                if r["digest"] not in present]
    for digest in sorted(present - referenced - {e["digest"] for e in journal}):
        named = [f"{m.name}@{m.version}" for m in live if m.digest == digest]
        names = f"manifest names {', '.join(named)}" if named else "no manifest"
        report.blobs_without_row.append(f"{digest} ({names})")
    for row in rows:
        ref = (row["name"], row["version"])
        if ref not in live_refs and (row["name"], row["digest"]) not in publishing:
            tomb = " (its manifest is a tombstone)" if ref in tombstoned else ""
            report.rows_without_manifest.append(f"{ref[0]}@{ref[1]}{tomb}")
    report.manifests_without_row = [f"{m.name}@{m.version} (blob {m.digest})" for m in live
                                    if m.ref not in refs and m.ref not in deleting]
    report.unreadable_manifests = manifests.unreadable
