"""A lost database never costs the adapter files, and the files alone bring the registry back.

- A store whose blobs exist but whose database is missing, empty or unreadable refuses to open,
  and `loraplex serve` on it refuses to start (one `error:` line naming the problem and the
  recovery command, exit 2), with nothing under the store touched; on a directory store and on
  a PostgreSQL registry beside shared blobs.
- `loraplex store rebuild` re-creates every version from the manifests (not the endpoints), and
  keeps version numbers from being reused; `loraplex store verify` reports rows without blobs
  and blobs without rows; `loraplex store backup` copies a store while it is open.

Everything runs for real: SQLite files, a PostgreSQL server, the `loraplex` command as a process.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from loraplex.adapters_store import AdapterStore, EndpointRecord, StoreError


def _serve(loraplex_cli, tiny_model, *store_args):
    """`loraplex serve` that should refuse at once; 60 s is ample for that and bounds a start that goes through."""
    return loraplex_cli("serve", "--model", tiny_model, *store_args, "--port", "0", "--metrics-port", "0",
                        timeout=60)


def _error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, (proc.returncode, proc.stderr)
    return errors[0]


def _lose(root: Path, how: str) -> None:
    """What an operator, a script or a disk can do to a store's database."""
    database = root / "registry.sqlite3"
    for leftover in (root / "registry.sqlite3-wal", root / "registry.sqlite3-shm"):
        leftover.unlink(missing_ok=True)
    if how == "emptied":
        database.write_bytes(b"")  # `: > registry.sqlite3`
    elif how == "deleted":
        database.unlink()
    else:
        database.write_bytes(b"not a database, whatever it was" * 64)


def _publish_some(store: AdapterStore, tiny_adapters, validate) -> None:
    """Two versions sharing a blob, a soft prompt, a deleted latest version, and an endpoint."""
    store.publish_dir("sum", tiny_adapters["mlp8"], validate)
    store.publish_dir("sum", tiny_adapters["all16"], validate)
    store.publish_dir("sql", tiny_adapters["mlp8"], validate)
    store.publish_dir("tone", tiny_adapters["soft"], validate)
    store.publish_dir("old", tiny_adapters["attn4"], validate)
    store.publish_dir("old", tiny_adapters["rs2"], validate)
    store.delete("old@2")
    store.create_endpoint(EndpointRecord(name="summary", adapter="sum@2", soft_prompt="tone", canary_adapter="sum@1",
                                         canary_weight=0.1, template="Summarize: {input}"))


@pytest.mark.parametrize("how", ["emptied", "deleted", "unreadable"])
def test_a_lost_database_refuses_to_open_and_touches_nothing(tmp_path, tiny_adapters, validate, tree, how):
    root = tmp_path / "s"
    with AdapterStore(root) as store:
        _publish_some(store, tiny_adapters, validate)
    _lose(root, how)
    before = tree(root)
    with pytest.raises(StoreError) as info:
        AdapterStore(root)
    assert info.value.code == "failed_precondition"
    problem = {"emptied": "is empty (0 bytes)", "deleted": "is missing", "unreadable": "is not a SQLite database"}[how]
    assert f"registry.sqlite3 {problem}" in info.value.message
    assert f"loraplex store rebuild --store {root}" in info.value.message
    assert tree(root) == before
    assert len(os.listdir(root / "blobs")) == 4


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_serve_refuses_to_start_on_a_store_whose_database_is_lost(tmp_path, tiny_model, tiny_adapters, validate,
                                                                   loraplex_cli, tree, how):
    root = tmp_path / "s"
    with AdapterStore(root) as store:
        _publish_some(store, tiny_adapters, validate)
    _lose(root, how)
    before = tree(root)
    line = _error_line(_serve(loraplex_cli, tiny_model, "--store", root))
    assert "registry.sqlite3 " + ("is empty (0 bytes)" if how == "emptied" else "is missing") in line
    assert f"holds 4 adapter blob(s)" in line and f"`loraplex store rebuild --store {root}`" in line
    assert tree(root) == before


def test_serve_refuses_to_start_on_an_empty_registry_beside_shared_blobs(postgres_dsn, new_database, tmp_path,
                                                                         tiny_model, tiny_adapters, validate,
                                                                         loraplex_cli, tree):
    shared = tmp_path / "shared"
    with AdapterStore(postgres_dsn, blobs=str(shared)) as store:
        _publish_some(store, tiny_adapters, validate)
    empty = new_database()
    before = tree(shared)
    line = _error_line(_serve(loraplex_cli, tiny_model, "--store", empty, "--blobs", shared))
    assert "holds no registry tables" in line and f"{shared / 'blobs'} holds 4 adapter blob(s)" in line
    assert "loraplex store rebuild" in line and "loraplex_ci:" not in line
    assert tree(shared) == before


class Layout:
    """A store as the command line names it, on a directory or on PostgreSQL with shared blobs."""

    def __init__(self, kind: str, tmp_path: Path, request) -> None:
        self.kind = kind
        self.files = tmp_path / ("s" if kind == "directory" else "shared")
        self.where = str(self.files) if kind == "directory" else request.getfixturevalue("postgres_dsn")
        self._new_database = request.getfixturevalue("new_database") if kind == "postgres" else None

    @property
    def args(self) -> list[str]:
        return ["--store", self.where] + ([] if self.kind == "directory" else ["--blobs", str(self.files)])

    def open(self) -> AdapterStore:
        return AdapterStore(self.where, blobs=None if self.kind == "directory" else self.files)

    def lose_database(self) -> None:
        """Empty the file; for PostgreSQL, point at a fresh empty database, as after losing the old one."""
        if self.kind == "directory":
            _lose(self.files, "emptied")
        else:
            self.where = self._new_database()


@pytest.fixture(params=["directory", "postgres"])
def layout(request, tmp_path) -> Layout:
    return Layout(request.param, tmp_path, request)


def test_rebuild_restores_every_version_from_the_blobs(layout, tiny_adapters, validate, loraplex_cli):
    with layout.open() as store:
        _publish_some(store, tiny_adapters, validate)
        before = store.list()
    layout.lose_database()
    with pytest.raises(StoreError):
        layout.open()

    checked = loraplex_cli("store", "verify", *layout.args)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "blobs without rows: 4" in checked.stdout and "manifests without a row" in checked.stdout

    rebuilt = loraplex_cli("store", "rebuild", *layout.args)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "restored 5 version(s) from their manifests: old@1, sql@1, sum@1, sum@2, tone@1" in rebuilt.stdout
    assert "endpoints are not recorded beside the blobs and were not restored" in rebuilt.stdout

    with layout.open() as store:
        assert store.list() == before  # names, versions, kinds, digests, sizes, publish times, metadata
        assert store.list_endpoints() == []
        assert store.publish_dir("old", tiny_adapters["rs2"], validate).ref == "old@3"  # 2 was deleted: never reused
    again = loraplex_cli("store", "rebuild", *layout.args)
    assert "restored 0 version(s)" in again.stdout and "6 version(s) already had a row" in again.stdout
    assert loraplex_cli("store", "verify", *layout.args).returncode == 0


def test_rebuild_adopts_blobs_without_manifests_only_when_asked(tmp_path, tiny_adapters, validate, loraplex_cli):
    """A store written before manifests existed, whose database is then lost: names are gone."""
    root = tmp_path / "s"
    with AdapterStore(root) as store:
        lora = store.publish_dir("a", tiny_adapters["mlp8"], validate)
        soft = store.publish_dir("s", tiny_adapters["soft"], validate)
    shutil.rmtree(root / "manifests")
    _lose(root, "emptied")

    kept = loraplex_cli("store", "rebuild", "--store", root)
    assert kept.returncode == 0, kept.stderr
    assert "restored 0 version(s)" in kept.stdout and "blobs no manifest names, kept: 2" in kept.stdout
    with pytest.raises(StoreError, match="has never registered an adapter"):
        AdapterStore(root)

    adopted = loraplex_cli("store", "rebuild", "--store", root, "--adopt-unnamed")
    assert adopted.returncode == 0, adopted.stderr
    assert "adopted: 2" in adopted.stdout
    with AdapterStore(root) as store:
        found = {(r.name, r.kind, r.digest) for r in store.list()}
        assert found == {(f"recovered-{lora.digest[:12]}", "lora", lora.digest),
                         (f"recovered-{soft.digest[:12]}", "soft_prompt", soft.digest)}
    assert loraplex_cli("store", "verify", "--store", root).returncode == 0


def test_verify_reports_rows_without_blobs_and_blobs_without_rows(tmp_path, tiny_adapters, validate, loraplex_cli):
    root = tmp_path / "s"
    with AdapterStore(root) as store:
        store.publish_dir("a", tiny_adapters["mlp8"], validate)
        gone = store.publish_dir("b", tiny_adapters["attn4"], validate)
    clean = loraplex_cli("store", "verify", "--store", root)
    assert clean.returncode == 0 and clean.stdout.splitlines()[-1] == "consistent", clean.stdout

    shutil.rmtree(root / "blobs" / gone.digest)
    stray = root / "blobs" / ("f" * 64)
    stray.mkdir()
    (stray / "adapter_config.json").write_text("{}")
    found = loraplex_cli("store", "verify", "--store", root)
    assert found.returncode == 1, found.stdout
    lines = found.stdout.splitlines()
    assert lines[lines.index("rows without blobs (cannot load): 1") + 1] == f"  b@1 (blob {gone.digest})"
    assert lines[lines.index("blobs without rows: 1") + 1] == f"  {stray.name} (no manifest)"
    assert lines[-1] == "NOT consistent"


def test_backup_copies_a_store_while_it_is_open_and_written(tmp_path, tiny_adapters, validate, loraplex_cli):
    root, dest = tmp_path / "s", tmp_path / "backup"
    store = AdapterStore(root)
    try:
        _publish_some(store, tiny_adapters, validate)
        stop = threading.Event()

        def churn() -> None:  # publishes and deletes while the backup runs
            while not stop.is_set():
                store.publish_dir("churn", tiny_adapters["rs2"], validate)
                store.delete("churn")

        writer = threading.Thread(target=churn)
        writer.start()
        try:
            done = loraplex_cli("store", "backup", dest, "--store", root)
        finally:
            stop.set()
            writer.join()
        assert done.returncode == 0, done.stderr
        assert f"backed up adapter store {root} to {dest}" in done.stdout
        expected = [(r.ref, r.digest, r.created_at, r.metadata) for r in store.list()]
        endpoints = store.list_endpoints()
    finally:
        store.close()
    checked = loraplex_cli("store", "verify", "--store", dest)
    assert checked.returncode == 0, checked.stdout
    with AdapterStore(dest) as copy:
        # a snapshot of one moment: the stable versions, and the churning name's version if it
        # existed at that moment (it was deleted again before `expected` was read)
        got = [(r.ref, r.digest, r.created_at, r.metadata) for r in copy.list()]
        assert [g for g in got if not g[0].startswith("churn@")] == expected
        assert len([g for g in got if g[0].startswith("churn@")]) <= 1
        assert copy.list_endpoints() == endpoints
        for record in copy.list():
            source = root / "blobs" / record.digest
            if record.name == "churn" and not source.exists():
                source = tiny_adapters["rs2"]  # its blob went with the delete; it held these files
            assert {p.name: p.read_bytes() for p in record.blob_dir.iterdir()} == \
                   {p.name: p.read_bytes() for p in source.iterdir()}

    refused = loraplex_cli("store", "backup", dest, "--store", root)
    assert "exists and is not an empty directory" in _error_line(refused)
    shared = loraplex_cli("store", "backup", tmp_path / "b2", "--store", "postgresql://u:p@127.0.0.1:1/x")
    assert "pg_dump" in _error_line(shared)


def test_rebuild_refuses_while_a_server_has_the_store_open(tmp_path, tiny_adapters, validate, loraplex_cli):
    root = tmp_path / "s"
    with AdapterStore(root) as store:
        store.publish_dir("a", tiny_adapters["mlp8"], validate)
        refused = loraplex_cli("store", "rebuild", "--store", root)
        assert "is open in another process" in _error_line(refused)
        manifest = next((root / "manifests").glob("*/a@1.json"))
        assert json.loads(manifest.read_text())["deleted_at"] is None
