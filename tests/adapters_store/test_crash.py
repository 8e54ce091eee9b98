"""A registration or deletion interrupted at any point leaves the store as it was, or as it
would have been had the operation finished; and only what the interrupted operation's journal
entry names is ever removed.

Two kinds of interruption: an exception (the store cleans up at once), and a real crash, a
child process that dies with ``os._exit`` mid-operation so no cleanup code runs; the next open
must then settle what it left. The crash test runs on a store directory and on a shared
registry (PostgreSQL and a shared blob directory), as a replica that died would leave it.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest

from loraplex.adapters_store import AdapterStore, journal
from loraplex.adapters_store.blobs import BlobStore
from loraplex.adapters_store.sqlite_metadata import SqliteTx

CRASH_EXIT = 17

CHILD = textwrap.dedent(
    """
    import os, sys
    from loraplex.adapters_store import AdapterStore, journal
    from loraplex.adapters_store.blobs import BlobStore
    from loraplex.adapters_store.postgres_metadata import PostgresTx
    from loraplex.adapters_store.sqlite_metadata import SqliteTx

    where, blobs, source, point = sys.argv[1:]

    def crash(*args, **kwargs):
        os._exit(%d)

    store = AdapterStore(where, blobs=blobs or None)
    if point == "mid_delete":
        store.publish_dir("sql", source, lambda d: {"kind": "lora"})
        journal._tombstone = crash  # the rows are deleted; the manifest and the blob are not yet settled
        store.delete("sql")
    if point == "before_rename":
        BlobStore.place = crash
    elif point == "after_rename":
        SqliteTx.insert_adapter = PostgresTx.insert_adapter = crash
    elif point == "after_commit":
        journal.record_missing = crash  # the row is committed; its manifest is not written yet
    store.publish_dir("sql", source, lambda d: {"kind": "lora"})
    """
    % CRASH_EXIT
)


class Registry:
    """One registry as the tests see it: how to open it, and its files and journal read directly."""

    def __init__(self, where: str, blobs: Path | None, files: Path) -> None:
        self.where, self.blobs, self.files = where, blobs, files

    def open(self) -> AdapterStore:
        return AdapterStore(self.where, blobs=self.blobs)

    def blob_names(self) -> list[str]:
        return sorted(os.listdir(self.files / "blobs"))

    def manifests(self) -> dict[str, bool]:
        """``name@version`` -> live (False: a tombstone)."""
        found = {}
        for path in (self.files / "manifests").glob("*/*.json"):
            found[path.stem] = json.loads(path.read_text())["deleted_at"] is None
        return found

    def journal(self) -> list[str]:
        """The operations the journal names, read without opening the store (which would settle them)."""
        query = "SELECT op FROM journal ORDER BY op"
        if self.blobs is None:
            with closing(sqlite3.connect(self.files / "registry.sqlite3")) as conn:
                return [op for (op,) in conn.execute(query)]
        import psycopg

        with psycopg.connect(self.where) as conn:
            return [op for (op,) in conn.execute(query)]


@pytest.fixture(params=["directory", "postgres"])
def registry(request, tmp_path) -> Registry:
    if request.param == "directory":
        return Registry(str(tmp_path / "s"), None, tmp_path / "s")
    return Registry(request.getfixturevalue("postgres_dsn"), tmp_path / "shared", tmp_path / "shared")


def listing(root) -> tuple[list[str], list[str]]:
    return sorted(os.listdir(root / "blobs")), sorted(os.listdir(root / "staging"))


def assert_clean(store: AdapterStore, keep: set[str] = frozenset()) -> None:
    assert set(os.listdir(store.root / "blobs")) == set(keep)
    assert os.listdir(store.root / "staging") == []


def _raise(*args):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("point", ["before_rename", "after_rename"])
def test_exception_mid_publish_leaves_nothing(tmp_path, tiny_adapters, validate, monkeypatch, point):
    store = AdapterStore(tmp_path / "s")
    try:
        kept = store.publish_dir("other", tiny_adapters["mlp8"], validate)
        with monkeypatch.context() as patch:
            if point == "before_rename":
                patch.setattr(BlobStore, "place", _raise)
            else:
                patch.setattr(SqliteTx, "insert_adapter", _raise)
            with pytest.raises(RuntimeError, match="injected"):
                store.publish_dir("sql", tiny_adapters["attn4"], validate)
        assert store.list() == [kept]
        assert_clean(store, {kept.digest})
    finally:
        store.close()
    with AdapterStore(tmp_path / "s") as reopened:
        assert reopened.list() == [kept]
        assert_clean(reopened, {kept.digest})
        assert reopened.publish_dir("sql", tiny_adapters["attn4"], validate).version == 1


@pytest.mark.parametrize("point", ["before_rename", "after_rename", "after_commit", "mid_delete"])
def test_crash_mid_publish_is_recovered_on_open(registry, tiny_adapters, validate, monkeypatch, point, tmp_path):
    with registry.open() as store:
        kept = store.publish_dir("other", tiny_adapters["mlp8"], validate)
    child = subprocess.run([sys.executable, "-c", CHILD, registry.where, str(registry.blobs or ""),
                            str(tiny_adapters["attn4"]), point], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path)  # never the repository root: it must not shadow installed packages
    assert child.returncode == CRASH_EXIT, child.stderr

    blobs = registry.blob_names()
    if point == "before_rename":
        assert blobs == [kept.digest]  # the staged copy was left behind in the child's staging directory
    else:
        assert len(blobs) == 2  # a blob only the journal accounts for, or one a committed row uses
    assert registry.journal() == ["delete" if point == "mid_delete" else "publish"]
    assert registry.manifests() == ({"other@1": True, "sql@1": True} if point == "mid_delete" else {"other@1": True})

    with registry.open() as reopened:
        if point == "after_commit":  # the registration had committed: it stays, and gets its manifest
            assert [r.ref for r in reopened.list()] == ["other@1", "sql@1"]
            assert registry.blob_names() == sorted([kept.digest, reopened.get("sql").digest])
            assert registry.manifests() == {"other@1": True, "sql@1": True}
        else:
            assert reopened.list() == [kept]
            assert registry.blob_names() == [kept.digest]
        if registry.blobs is None:
            assert os.listdir(reopened.root / "staging") == []
            assert registry.journal() == []
        else:  # settled, but kept while it may belong to another replica's operation in flight
            assert len(registry.journal()) == 1
        if point == "mid_delete":  # the deletion is finished: a tombstone, and the number is not reused
            assert registry.manifests() == {"other@1": True, "sql@1": False}
        if point != "after_commit":
            again = "sql@2" if point == "mid_delete" else "sql@1"
            assert reopened.publish_dir("sql", tiny_adapters["attn4"], validate).ref == again
    monkeypatch.setattr(journal, "STALE_AFTER_S", 0.0)
    with registry.open():
        assert registry.journal() == []


def test_a_blob_no_journal_names_is_kept_on_open(registry, tiny_adapters, validate):
    """A blob no row uses, that no interrupted operation names (here: planted; in life, a blob
    of a version the database forgot), survives every open: it is reported, never removed."""
    with registry.open() as store:
        kept = store.publish_dir("kept", tiny_adapters["attn4"], validate)
    stray = registry.files / "blobs" / ("0" * 64)
    stray.mkdir()
    (stray / "adapter_config.json").write_text("{}")
    for _ in range(2):
        with registry.open() as store:
            assert store.list() == [kept]
    assert registry.blob_names() == sorted([kept.digest, stray.name])
    assert (stray / "adapter_config.json").read_text() == "{}"


def test_no_recovery_while_another_store_has_the_directory_open(tmp_path):
    root = tmp_path / "s"
    first = AdapterStore(root)
    try:
        with first.staging() as in_progress:
            (in_progress / "adapter_config.json").write_text("{}")
            with AdapterStore(root) as second:
                assert second.list() == []
            assert (in_progress / "adapter_config.json").exists()
    finally:
        first.close()
