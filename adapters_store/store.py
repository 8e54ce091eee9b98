"""The adapter registry: validated, versioned, content-addressed adapters and the endpoints using them.

Layout of a store directory::

    registry.sqlite3      metadata (adapter versions, endpoints, the journal), see :mod:`.migrations`
    blobs/<sha256>/       one directory per distinct adapter content, shared by versions
    manifests/<sha256>/   one manifest per version using that blob (see :mod:`.manifests`)
    staging/              registrations (and blob removals) in progress
    store.lock            who has the store open (see :mod:`.lock`)

Publishing is crash-safe by ordering: the adapter is written and checked in ``staging/``, the
intent is journaled, the directory is renamed into ``blobs/`` (atomic, same filesystem), and
only then does it become visible through one committed row; its manifest follows. A crash
leaves at most a staging leftover, removed the next time the store is opened by a sole user, or
a blob that a journal entry names, removed by the next open if no row took it (:mod:`.journal`).
Nothing else is ever removed at open: a database that is missing, empty or unreadable while
blobs exist makes the open fail instead (:mod:`.guard`).

Blob placement and row insertion share one metadata write transaction, as do the "is this
digest still used?" check and the blob removal when a delete is settled, so a delete can never
remove a blob that a concurrent publish of identical content has just decided to reuse.

Thread safety: one store object may be used from many threads. Validation, hashing and
copying run unlocked and in parallel; metadata transactions are serialised (see
:mod:`.sqlite_metadata`).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .blobs import BlobStore, present_digests
from .endpoints import check_endpoint
from .errors import StoreError
from .files import copy_files, digest_files, scan_flat_dir, seal
from .guard import Guard
from .journal import delete_entries, new_op, publish_entry, settle, stale
from .limits import IDEMPOTENCY_SECONDS, check_idempotency_key, checked_metadata, short_text
from .lock import StoreLock
from .manifests import record_missing
from .metadata import Metadata, MetadataTx, Row
from .names import format_ref, parse_ref, validate_name
from .postgres_metadata import PostgresMetadata, is_postgres_url
from .records import AdapterRecord, EndpointRecord
from .remote_blobs import RemoteBlobStore
from .sqlite_metadata import SqliteMetadata, probe_file
from .staging import StagingArea

log = logging.getLogger(__name__)

DEFAULT_MAX_ADAPTER_BYTES = 4 * 1024**3

Validate = Callable[[Path], dict]
AdapterList = list[AdapterRecord]
EndpointList = list[EndpointRecord]

# Endpoint field -> (row columns, required kind, what to call it in messages).
_ENDPOINT_REFS = (
    ("adapter", "adapter_name", "adapter_version", "lora", "adapter"),
    ("soft_prompt", "soft_prompt_name", "soft_prompt_version", "soft_prompt", "soft prompt"),
    ("canary_adapter", "canary_name", "canary_version", "lora", "canary adapter"),
)


class AdapterStore:
    """A registry rooted at one directory (SQLite + blobs inside it), or shared by several
    replicas: metadata in PostgreSQL (``root="postgresql://..."``) and blobs in a shared
    directory or a bucket (``blobs``). Every method is safe to call from several threads."""

    def __init__(self, root: str | Path, *, max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
                 blobs: str | Path | None = None, cache: Path | None = None, guard: bool = True) -> None:
        """``guard=False`` opens a store whose database is missing or empty although blobs exist
        (``loraplex store rebuild`` does, to re-create it); anything else refuses such a store."""
        self.max_adapter_bytes = max_adapter_bytes
        self._lock: StoreLock | None = None
        self._guarded = guard
        self.exclusive = False  # whether this open was the store's sole user (and so cleared staging)
        if is_postgres_url(str(root)):
            self._open_shared(str(root), blobs, cache, guard)
            return
        if blobs is not None:
            raise ValueError("--blobs goes with --store postgresql://...; a store directory keeps its blobs inside")
        self.root = Path(root)
        self.where = str(self.root)
        check = self._directory_guard() if guard else None
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = StoreLock(self.root / "store.lock")
        try:
            self.exclusive = self._lock.try_exclusive()
            self._staging = StagingArea(self.root / "staging")
            self._blobs: BlobStore | RemoteBlobStore = BlobStore(self.root / "blobs", self._staging)
            self._db: Metadata = SqliteMetadata(self.root / "registry.sqlite3", check)
        except BaseException:
            self._lock.release()
            raise
        try:
            if self.exclusive:
                self._recover(sole_user=True)
            self._lock.share()
        except BaseException:
            self.close()
            raise

    def _directory_guard(self) -> Guard:
        """The guard of a store directory, after checking its database file: a refusal here
        comes before anything is created (see :mod:`.guard`)."""
        check = Guard(store=f"adapter store {self.root}", blobs_where=str(self.root / "blobs"),
                      present=frozenset(present_digests(self.root / "blobs")),
                      rebuild=f"loraplex store rebuild --store {shlex.quote(str(self.root))}")
        database = self.root / "registry.sqlite3"
        problem = probe_file(database)
        if problem is not None:
            check.check_file(database.name, problem.text, problem.unreadable)
        return check

    def _open_shared(self, dsn: str, blobs: str | Path | None, cache: Path | None, guard: bool) -> None:
        """Several replicas, one registry: PostgreSQL metadata; blobs in a shared directory (each
        process stages in a directory of its own there) or behind a URL (cached in ``cache``).
        The blobs are listed and the database checked before anything is created (:mod:`.guard`)."""
        if blobs is None:
            raise ValueError("--store postgresql://... needs --blobs DIR (a directory every replica mounts) "
                             "or --blobs s3://bucket/prefix: where the adapter files live")
        remote = None
        if "://" in str(blobs):
            remote = RemoteBlobStore(str(blobs), Path(cache or Path.home() / ".cache/loraplex/blobs"))
        shared = Path(blobs)
        check = Guard(store="adapter store", blobs_where=str(blobs) if remote else str(shared / "blobs"),
                      present=frozenset(remote.digests() if remote else present_digests(shared / "blobs")),
                      rebuild="loraplex store rebuild --store <the same postgresql:// URL> "
                              f"--blobs {shlex.quote(str(blobs))}")
        self._db = PostgresMetadata(dsn, check if guard else None)
        if remote is not None:
            self._blobs, self._staging = remote, remote.staging
        else:
            self._staging = StagingArea(shared / "staging" / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            self._blobs = BlobStore(shared / "blobs", self._staging)
        self.root = None
        self.where = f"{self._db.where} (blobs in {blobs})"
        try:
            self._recover(sole_user=False)  # other replicas may be mid-registration
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the database and the store lock; the object is unusable afterwards."""
        self._db.close()
        if self._lock is not None:
            self._lock.release()
        elif self.root is None and isinstance(self._blobs, BlobStore):
            shutil.rmtree(self._staging.root, ignore_errors=True)  # this process's own staging directory

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recover(self, sole_user: bool) -> None:
        """Settle what interrupted operations left (:mod:`.journal`): staging leftovers (only when
        nobody else can be mid-registration), blobs a journal entry names that no row took, and
        manifests not yet written. Blobs that nothing licenses removing are kept and reported."""
        leftovers = self._staging.clear() if sole_user else []
        with self._db.write() as tx:
            entries = tx.journal_entries()
            removed = settle(tx, entries, self._blobs)
            tx.delete_journal(stale(entries, sole_user))
            rows = tx.list_adapters()
            written, unwritten = record_missing(self._blobs, rows)
        if leftovers or removed:
            log.warning("adapter store %s: removed %d staging leftover(s) and %d blob(s) that interrupted "
                        "operations left", self.where, len(leftovers), len(removed))
        if written:
            log.info("adapter store %s: wrote %d missing version manifest(s)", self.where, written)
        if unwritten:
            log.error("adapter store %s: could not write the manifest of %s; the next open tries again",
                      self.where, "; ".join(unwritten))
        self._report_blobs({row["digest"] for row in rows})

    def _report_blobs(self, referenced: set[str]) -> None:
        """Log blobs no version uses (kept: nothing licenses removing them) and versions whose blob is gone."""
        present = self._blobs.digests()
        if present - referenced and self._guarded:  # rebuild (unguarded) reports them itself
            log.warning("adapter store %s: kept %d blob(s) that no registered version uses and no journal entry "
                        "names; `loraplex store verify` lists them", self.where, len(present - referenced))
        if referenced - present:
            log.error("adapter store %s: blob(s) %s are referenced but missing; those adapters cannot load",
                      self.where, ", ".join(sorted(referenced - present)))

    def _settle(self, op_id: str) -> None:
        """Finish or undo one operation under the writers' lock. If that fails (the database went
        away), its journal entries stay for the next open to settle."""
        try:
            with self._db.write() as tx:
                settle(tx, tx.journal_entries(op_id), self._blobs)
                tx.delete_journal({op_id})
        except (StoreError, OSError) as exc:
            log.error("adapter store %s: could not settle operation %s now (%s); the next open will", self.where,
                      op_id, exc)

    @property
    def metadata(self) -> Metadata:
        """The metadata backend, for the maintenance commands (:mod:`.rebuild`)."""
        return self._db

    @property
    def blobs(self) -> BlobStore | RemoteBlobStore:
        """The blob store, for the maintenance commands (:mod:`.rebuild`)."""
        return self._blobs

    def local_dir(self, record: AdapterRecord) -> Path:
        """The record's files on this machine (downloaded once from a bucket if need be)."""
        return self._blobs.local(record.digest)

    # ---------------------------------------------------------------- adapters

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh empty directory to assemble an adapter in, removed on exit whatever happens."""
        with self._staging.new() as path:
            yield path

    def publish(self, name: str, staged: Path, validate: Validate, idempotency_key: str | None = None) -> AdapterRecord:
        """Register the files in ``staged`` (a directory from :meth:`staging`) as the next version of ``name``.

        ``validate(staged)`` vets the adapter and returns its metadata, which must hold
        ``"kind"``; its exceptions propagate unchanged. ``staged`` is consumed (renamed into
        the blobs) or left for :meth:`staging` to remove. With an ``idempotency_key`` already
        used for the same name and content within :data:`IDEMPOTENCY_SECONDS`, nothing is
        registered and the version that first call made is returned (a client retrying a call
        whose answer it lost gets the first result, not a second version).
        """
        validate_name(name)
        staged = Path(staged)
        if not self._staging.owns(staged):
            raise ValueError(f"publish() takes a directory made by AdapterStore.staging(), got {staged}")
        where = f"adapter {name!r}"
        files = scan_flat_dir(staged, self.max_adapter_bytes, where)
        digest, size = digest_files(staged, files, self.max_adapter_bytes, where)
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
            with self._db.read() as tx:
                earlier = self._earlier(tx, idempotency_key, name, digest)
            if earlier is not None:
                return earlier
        metadata = checked_metadata(validate(staged))
        seal(staged, files)
        op_id = new_op()
        with self._db.write() as tx:
            tx.insert_journal(publish_entry(op_id, name, digest))
        try:
            with self._db.write() as tx:
                earlier = None if idempotency_key is None else self._earlier(tx, idempotency_key, name, digest)
                if earlier is not None:  # a concurrent retry registered it first; the journal drops our copy
                    return earlier
                self._blobs.place(staged, digest)
                row = {"name": name, "version": tx.allocate_version(name), "kind": metadata["kind"],
                       "digest": digest, "size_bytes": size, "created_at": time.time(), "metadata": metadata}
                tx.insert_adapter(row)
                if idempotency_key is not None:
                    tx.remember_idempotent(idempotency_key, name, row["version"], digest, row["created_at"],
                                           IDEMPOTENCY_SECONDS)
        finally:
            self._settle(op_id)
        return self._adapter(row)

    def _earlier(self, tx: MetadataTx, key: str, name: str, digest: str) -> AdapterRecord | None:
        """The version an earlier registration under ``key`` made, if that is the same request."""
        found = tx.idempotent_result(key)
        if found is None or found["created_at"] < time.time() - IDEMPOTENCY_SECONDS:
            return None
        ref = format_ref(found["name"], found["version"])
        if (found["name"], found["digest"]) != (name, digest):
            what = "another adapter name" if found["name"] != name else "other files"
            raise StoreError("failed_precondition", f"idempotency key {short_text(key)} already registered {ref} with "
                                                    f"{what}; a new registration needs a new key")
        row = tx.get_adapter(found["name"], found["version"])
        if row is None:
            raise StoreError("failed_precondition", f"idempotency key {short_text(key)} registered {ref}, which has "
                                                    "since been deleted; a new registration needs a new key")
        return self._adapter(row)

    def publish_dir(self, name: str, source: Path, validate: Validate,
                    idempotency_key: str | None = None) -> AdapterRecord:
        """Copy an adapter directory on this machine into staging, then :meth:`publish` it.

        Only a flat directory of regular files is accepted; symlinks, subdirectories and
        anything else are refused, all listed in one error.
        """
        validate_name(name)
        where = f"adapter directory {source}"
        files = scan_flat_dir(Path(source), self.max_adapter_bytes, where)
        with self.staging() as staged:
            copy_files(Path(source), staged, files, self.max_adapter_bytes, where)
            return self.publish(name, staged, validate, idempotency_key)

    def get(self, ref: str) -> AdapterRecord:
        """``"name"``: the latest version; ``"name@v"``: that version."""
        name, version = parse_ref(ref)
        with self._db.read() as tx:
            return self._adapter(self._find(tx, name, version))

    def list(self) -> AdapterList:
        """Every version of every adapter, by name then version."""
        with self._db.read() as tx:
            return [self._adapter(row) for row in tx.list_adapters()]

    def list_page(self, after: tuple[str, int] | None, limit: int) -> tuple[AdapterList, tuple[str, int] | None]:
        """Up to ``limit`` versions after ``(name, version)``, by name then version, and where the
        next page starts (None after the last)."""
        with self._db.read() as tx:
            rows = tx.list_adapters_after(after, limit + 1)
        page = [self._adapter(row) for row in rows[:limit]]
        more = len(rows) > limit
        return page, (page[-1].name, page[-1].version) if more else None

    def versions(self, name: str) -> AdapterList:
        """Every version of ``name``, oldest first; ``not_found`` if it has none."""
        validate_name(name)
        with self._db.read() as tx:
            rows = tx.list_adapters(name)
        if not rows:
            raise StoreError("not_found", f"adapter {name!r} not found")
        return [self._adapter(row) for row in rows]

    def delete(self, ref: str) -> AdapterList:
        """Delete ``"name"`` (every version) or ``"name@v"``; refused while an endpoint uses it."""
        name, version = parse_ref(ref)
        op_id = new_op()
        with self._db.write() as tx:
            rows = [self._find(tx, name, version)] if version is not None else tx.list_adapters(name)
            if not rows:
                raise StoreError("not_found", f"adapter {name!r} not found")
            users = tx.endpoints_using(name, version)
            if users:
                named = ", ".join(f"{endpoint!r} ({field})" for endpoint, field in users)
                raise StoreError(
                    "failed_precondition",
                    f"adapter {ref!r} is used by endpoint(s) {named}; update or delete those endpoints first",
                )
            tx.delete_adapters(name, version)
            tx.insert_journal(delete_entries(op_id, rows))
        self._settle(op_id)
        return [self._adapter(row) for row in rows]

    def _find(self, tx: MetadataTx, name: str, version: int | None) -> Row:
        row = tx.get_adapter(name, version)
        if row is not None:
            return row
        if version is None:
            raise StoreError("not_found", f"adapter {name!r} not found")
        others = [r["version"] for r in tx.list_adapters(name)]
        have = f"its versions are {', '.join(map(str, others))}" if others else "no version of it exists"
        raise StoreError("not_found", f"adapter {format_ref(name, version)!r} not found ({have})")

    def _adapter(self, row: Row) -> AdapterRecord:
        return AdapterRecord(
            name=row["name"], version=row["version"], kind=row["kind"], digest=row["digest"],
            size_bytes=row["size_bytes"], created_at=row["created_at"], metadata=dict(row["metadata"]),
            blob_dir=self._blobs.path(row["digest"]),
        )

    # ---------------------------------------------------------------- endpoints

    def create_endpoint(self, rec: EndpointRecord) -> EndpointRecord:
        """Save a new endpoint; ``"name"`` references resolve to the latest version now."""
        rec = check_endpoint(rec)
        with self._db.write() as tx:
            if tx.get_endpoint(rec.name) is not None:
                raise StoreError("already_exists", f"endpoint {rec.name!r} already exists")
            now = time.time()
            row = self._endpoint_row(tx, rec, created_at=now, updated_at=now)
            tx.insert_endpoint(row)
        return _endpoint(row)

    def update_endpoint(self, rec: EndpointRecord) -> EndpointRecord:
        """Replace an endpoint's settings in one row update; new requests see all or none of it."""
        rec = check_endpoint(rec)
        with self._db.write() as tx:
            old = tx.get_endpoint(rec.name)
            if old is None:
                raise StoreError("not_found", f"endpoint {rec.name!r} not found")
            row = self._endpoint_row(tx, rec, created_at=old["created_at"], updated_at=time.time())
            tx.update_endpoint(row)
        return _endpoint(row)

    def get_endpoint(self, name: str) -> EndpointRecord:
        validate_name(name, "endpoint")
        with self._db.read() as tx:
            row = tx.get_endpoint(name)
        if row is None:
            raise StoreError("not_found", f"endpoint {name!r} not found")
        return _endpoint(row)

    def list_endpoints(self) -> EndpointList:
        """Every endpoint, by name."""
        with self._db.read() as tx:
            return [_endpoint(row) for row in tx.list_endpoints()]

    def list_endpoints_page(self, after: str | None, limit: int) -> tuple[EndpointList, str | None]:
        """Up to ``limit`` endpoints named after ``after``, by name, and the name the next page
        starts after (None after the last)."""
        with self._db.read() as tx:
            rows = tx.list_endpoints_after(after, limit + 1)
        page = [_endpoint(row) for row in rows[:limit]]
        return page, page[-1].name if len(rows) > limit else None

    def delete_endpoint(self, name: str) -> EndpointRecord:
        """Delete an endpoint; returns what it was."""
        validate_name(name, "endpoint")
        with self._db.write() as tx:
            row = tx.get_endpoint(name)
            if row is None:
                raise StoreError("not_found", f"endpoint {name!r} not found")
            tx.delete_endpoint(name)
        return _endpoint(row)

    def _endpoint_row(self, tx: MetadataTx, rec: EndpointRecord, created_at: float, updated_at: float) -> Row:
        row: Row = {
            "name": rec.name, "canary_weight": rec.canary_weight, "template": rec.template,
            "system_message": rec.system_message, "defaults": rec.defaults,
            "max_new_tokens_cap": rec.max_new_tokens_cap, "created_at": created_at, "updated_at": updated_at,
        }
        for field, name_col, version_col, kind, what in _ENDPOINT_REFS:
            ref = getattr(rec, field)
            row[name_col] = row[version_col] = None
            if ref is None:
                continue
            name, version = parse_ref(ref, what)
            try:
                target = self._find(tx, name, version)
            except StoreError as exc:
                raise StoreError(exc.code, f"endpoint {rec.name!r}: {what} {ref!r}: {exc.message}") from None
            if target["kind"] != kind:
                raise StoreError(
                    "invalid",
                    f"endpoint {rec.name!r}: {what} {ref!r} is a {target['kind']} adapter; this field takes a {kind}",
                )
            row[name_col], row[version_col] = target["name"], target["version"]
        if row["canary_name"] is not None and (row["canary_name"], row["canary_version"]) == (
            row["adapter_name"], row["adapter_version"]
        ):
            raise StoreError(
                "invalid",
                f"endpoint {rec.name!r}: canary adapter and adapter are both "
                f"{format_ref(row['adapter_name'], row['adapter_version'])}; a canary needs a different version",
            )
        return row


def _endpoint(row: Row) -> EndpointRecord:
    def ref(name_col: str, version_col: str) -> str | None:
        return None if row[name_col] is None else format_ref(row[name_col], row[version_col])

    return EndpointRecord(
        name=row["name"], adapter=ref("adapter_name", "adapter_version"),
        soft_prompt=ref("soft_prompt_name", "soft_prompt_version"), template=row["template"],
        system_message=row["system_message"], defaults=dict(row["defaults"]),
        max_new_tokens_cap=row["max_new_tokens_cap"], canary_adapter=ref("canary_name", "canary_version"),
        canary_weight=float(row["canary_weight"]), created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )
