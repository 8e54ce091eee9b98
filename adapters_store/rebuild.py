"""``loraplex store rebuild``: re-create the registry's rows from the blobs and their manifests.

When: the database was lost, emptied or replaced (the server then refuses to start and names
this command), or restored from a backup older than the blobs. The store is opened without the
guard, so a missing or empty database is created and migrated, and the journal is settled as at
any open; then, in one write transaction:

- every live manifest whose version has no row becomes a row again, with its own version
  number, kind, size, publish time and validation metadata, provided its blob is present and
  the blob's ``adapter_config.json`` still hashes to the manifest's ``config_sha256``;
- each name's version counter is raised to the highest version any of its manifests has held,
  tombstones included, so a deleted version's number is never handed out again;
- rows already present are left alone: where the database has an answer it stays the truth.

What it cannot recover, and reports:

- endpoints: they live only in the database (``loraplex store backup`` keeps them);
- blobs with no manifest (published before manifests existed, in a store whose database was
  lost before this release opened it): their names and versions are gone. With
  ``adopt_unnamed`` each is registered as ``recovered-<first 12 hex digits of its digest>``,
  its kind read from its PEFT config and its content checked against its digest; otherwise they
  are listed and kept;
- the numbers of versions deleted before manifests existed, which may be given out again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .errors import StoreError
from .files import digest_files, scan_flat_dir
from .manifests import CONFIG_FILE, Manifest, config_sha256, record, scan
from .metadata import MetadataTx, Row
from .store import AdapterStore

PEFT_KINDS = {"LORA": "lora", "PROMPT_TUNING": "soft_prompt"}
ADOPTED_PREFIX = "recovered-"


@dataclass
class RebuildReport:
    restored: list[str] = field(default_factory=list)  # refs re-created from their manifests
    already: int = 0  # live manifests whose version already had a row
    not_restored: list[str] = field(default_factory=list)  # "ref: why"
    unreadable: list[str] = field(default_factory=list)  # manifest files that could not be parsed
    unnamed: list[str] = field(default_factory=list)  # blobs no row and no manifest names, kept
    adopted: list[str] = field(default_factory=list)  # "ref (digest)"
    endpoints: int = 0  # endpoints the database holds afterwards


def rebuild(store: AdapterStore, adopt_unnamed: bool = False) -> RebuildReport:
    """Restore what the manifests describe (see the module docstring); ``store`` is opened with ``guard=False``."""
    blobs = store.blobs
    found = scan(blobs.manifests)
    present = blobs.digests()
    report = RebuildReport(unreadable=found.unreadable)
    adopted: list[Row] = []
    with store.metadata.write() as tx:
        _restore(tx, store, found.manifests, present, report)
        referenced = {row["digest"] for row in tx.list_adapters()}
        named = {m.digest for m in found.manifests if m.live}
        unnamed = sorted(present - referenced - named)
        if adopt_unnamed:
            adopted = _adopt_all(tx, store, unnamed, report)
        else:
            report.unnamed = unnamed
        report.endpoints = len(tx.list_endpoints())
    for row in adopted:
        record(blobs, row)
    return report


def _restore(tx: MetadataTx, store: AdapterStore, manifests: list[Manifest], present: set[str],
             report: RebuildReport) -> None:
    have = {(row["name"], row["version"]) for row in tx.list_adapters()}
    for manifest in manifests:
        if not manifest.live:
            continue
        if manifest.ref in have:
            report.already += 1
            continue
        problem = _problem(store, manifest, present)
        if problem:
            report.not_restored.append(f"{manifest.name}@{manifest.version}: {problem}")
            continue
        tx.restore_adapter(manifest.row())
        have.add(manifest.ref)
        report.restored.append(f"{manifest.name}@{manifest.version}")
    for name, version in _highest(manifests).items():
        tx.raise_last_version(name, version)


def _problem(store: AdapterStore, manifest: Manifest, present: set[str]) -> str | None:
    if manifest.digest not in present:
        return f"its blob {manifest.digest} is missing"
    found = config_sha256(store.blobs.local(manifest.digest))
    if found != manifest.config_sha256:
        return (f"the {CONFIG_FILE} in blob {manifest.digest} hashes to {found}, "
                f"its manifest says {manifest.config_sha256}")
    return None


def _highest(manifests: list[Manifest]) -> dict[str, int]:
    highest: dict[str, int] = {}
    for manifest in manifests:
        highest[manifest.name] = max(highest.get(manifest.name, 0), manifest.version)
    return highest


def _adopt_all(tx: MetadataTx, store: AdapterStore, digests: list[str], report: RebuildReport) -> list[Row]:
    rows = []
    for digest in digests:
        try:
            row = _adopt(tx, store, digest)
        except (StoreError, OSError, ValueError) as exc:
            report.unnamed.append(f"{digest} (not adopted: {exc})")
            continue
        rows.append(row)
        report.adopted.append(f"{row['name']}@{row['version']} ({digest})")
    return rows


def _adopt(tx: MetadataTx, store: AdapterStore, digest: str) -> Row:
    """Register a blob nothing names under a made-up name, once its content matches its digest."""
    folder = store.blobs.local(digest)
    where = f"blob {digest}"
    files = scan_flat_dir(folder, store.max_adapter_bytes, where)
    content, size = digest_files(folder, files, store.max_adapter_bytes, where)
    if content != digest:
        raise ValueError(f"its content hashes to {content}")
    peft_type = json.loads((folder / CONFIG_FILE).read_text()).get("peft_type")
    if peft_type not in PEFT_KINDS:
        raise ValueError(f"its {CONFIG_FILE} has peft_type {peft_type!r}; loraplex serves {sorted(PEFT_KINDS)}")
    kind = PEFT_KINDS[peft_type]
    name = ADOPTED_PREFIX + digest[:12]
    metadata = {"kind": kind, "warnings": ["adopted by `loraplex store rebuild`: its name, version and "
                                           "validation details were lost with the database"]}
    row = {"name": name, "version": tx.allocate_version(name), "kind": kind, "digest": digest,
           "size_bytes": size, "created_at": time.time(), "metadata": metadata}
    tx.insert_adapter(row)
    return row
