"""A store written by the previous release opens in this one, migrated, and serves its rows.

`data/store_v1.sql` is the registry that commit 61c18fc (schema version 1, the release before
numbered migrations) wrote, as portable SQL; the blobs its rows name are re-created here from
V1_ADAPTERS, the very files that commit published. It loads into SQLite and into PostgreSQL.
"""
from __future__ import annotations

import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import pytest

from loraplex.adapters_store import AdapterStore, StoreError
from loraplex.adapters_store.files import digest_files, scan_flat_dir
from loraplex.adapters_store.migrations import LATEST, MIGRATIONS

V1_SQL = Path(__file__).parent / "data" / "store_v1.sql"
V1_ADAPTERS = {
    "a": {"adapter_config.json": '{"peft_type": "LORA", "r": 4}\n', "adapter_model.safetensors": "lora a weights\n"},
    "b": {"adapter_config.json": '{"peft_type": "LORA", "r": 8}\n', "adapter_model.safetensors": "lora b weights\n"},
    "c": {"adapter_config.json": '{"num_virtual_tokens": 5, "peft_type": "PROMPT_TUNING"}\n',
          "adapter_model.safetensors": "soft prompt c\n"},
}
# (ref, blob, kind, size, metadata) as the v1 store holds them; sum@3 (blob a) was deleted.
V1_VERSIONS = [
    ("sql@1", "a", "lora", 45, {"kind": "lora", "max_rank": 4, "ranks": {"q_proj": 4}, "warnings": []}),
    ("sum@1", "a", "lora", 45, {"kind": "lora", "max_rank": 4, "ranks": {"q_proj": 4}, "warnings": []}),
    ("sum@2", "b", "lora", 45, {"kind": "lora", "max_rank": 8, "ranks": {"q_proj": 8}, "warnings": []}),
    ("tone@1", "c", "soft_prompt", 70, {"kind": "soft_prompt", "num_virtual_tokens": 5, "warnings": []}),
]


def _write_adapter(folder: Path, key: str) -> Path:
    folder.mkdir(parents=True)
    for name, text in V1_ADAPTERS[key].items():
        (folder / name).write_text(text)
    return folder


def _place_v1_blobs(blobs: Path) -> dict[str, str]:
    """The blob directories the v1 rows name; returns adapter key -> digest."""
    digests = {}
    for key in V1_ADAPTERS:
        with tempfile.TemporaryDirectory() as tmp:
            staged = _write_adapter(Path(tmp) / key, key)
            digest, _ = digest_files(staged, scan_flat_dir(staged, 1 << 20, key), 1 << 20, key)
        _write_adapter(blobs / digest, key)
        digests[key] = digest
    return digests


class V1Store:
    def __init__(self, kind: str, tmp_path: Path, request) -> None:
        sql = V1_SQL.read_text()
        if kind == "directory":
            self.files, self.blobs = tmp_path / "s", None
            self.where = str(self.files)
            self.files.mkdir()
            with closing(sqlite3.connect(self.files / "registry.sqlite3")) as conn:
                conn.executescript(sql)
        else:
            import psycopg

            self.files = self.blobs = tmp_path / "shared"
            self.where = request.getfixturevalue("postgres_dsn")
            with psycopg.connect(self.where, autocommit=True) as conn:
                conn.execute(sql)
        self.digests = _place_v1_blobs(self.files / "blobs")

    def open(self) -> AdapterStore:
        return AdapterStore(self.where, blobs=self.blobs)

    def query(self, sql: str) -> list[tuple]:
        """Read the database directly, as it is on disk."""
        if self.blobs is None:
            with closing(sqlite3.connect(self.files / "registry.sqlite3")) as conn:
                return conn.execute(sql).fetchall()
        import psycopg

        with psycopg.connect(self.where) as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture(params=["directory", "postgres"])
def v1(request, tmp_path) -> V1Store:
    return V1Store(request.param, tmp_path, request)


def test_a_store_written_by_the_previous_release_opens_migrated_and_serves_its_rows(v1, tmp_path):
    assert v1.query("SELECT value FROM store_meta WHERE key = 'schema_version'") == [("1",)]
    with v1.open() as store:
        found = [(r.ref, r.digest, r.kind, r.size_bytes, r.metadata) for r in store.list()]
        assert found == [(ref, v1.digests[key], kind, size, meta) for ref, key, kind, size, meta in V1_VERSIONS]
        endpoint = store.get_endpoint("summary")
        assert (endpoint.adapter, endpoint.soft_prompt, endpoint.canary_adapter, endpoint.canary_weight,
                endpoint.template, endpoint.system_message, endpoint.defaults, endpoint.max_new_tokens_cap) == (
            "sum@2", "tone@1", "sum@1", 0.1, "Summarize: {input}", "Be brief.", {"temperature": 0.2}, 64)
        files = store.local_dir(store.get("sum@2"))
        assert {p.name: p.read_text() for p in files.iterdir()} == V1_ADAPTERS["b"]
        again = store.publish_dir("sum", _write_adapter(tmp_path / "src" / "a", "a"), lambda d: {"kind": "lora"})
        assert again.ref == "sum@4"  # the v1 counter (sum@3 was deleted there) carries over
    assert v1.query("SELECT value FROM store_meta WHERE key = 'schema_version'") == [(str(LATEST),)]
    assert v1.query("SELECT COUNT(*) FROM journal") == [(0,)]
    assert v1.query("SELECT COUNT(*) FROM idempotency_keys") == [(0,)]  # migration 3
    manifests = {p.stem for p in (v1.files / "manifests").glob("*/*.json")}
    assert manifests == {"sql@1", "sum@1", "sum@2", "tone@1", "sum@4"}  # written at the first open


def test_migrations_are_idempotent_and_a_newer_store_is_refused(v1):
    assert [m.number for m in MIGRATIONS] == list(range(1, LATEST + 1))
    with v1.open():
        pass
    version = "UPDATE store_meta SET value = '{}' WHERE key = 'schema_version'"
    _execute(v1, version.format(1))  # as if migration 2 had not been recorded: it runs again, harmlessly
    with v1.open() as store:
        assert [r.ref for r in store.list()] == [ref for ref, *_ in V1_VERSIONS]
    assert v1.query("SELECT value FROM store_meta WHERE key = 'schema_version'") == [(str(LATEST),)]
    _execute(v1, version.format(LATEST + 1))
    with pytest.raises(StoreError, match=f"schema version {LATEST + 1}, written by a newer loraplex"):
        v1.open()


def _execute(v1: V1Store, sql: str) -> None:
    if v1.blobs is None:
        with closing(sqlite3.connect(v1.files / "registry.sqlite3", isolation_level=None)) as conn:
            conn.execute(sql)
        return
    import psycopg

    with psycopg.connect(v1.where, autocommit=True) as conn:
        conn.execute(sql)
