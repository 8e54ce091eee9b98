"""What a registry row may hold and how listings and retries behave, on SQLite and PostgreSQL:
bounded metadata, idempotency keys (a retry returns the first result, across a reopen, once under
concurrency), and pages that walk every row exactly once."""
from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from loraplex.adapters_store import AdapterStore, StoreError
from loraplex.adapters_store.limits import IDEMPOTENCY_SECONDS, MAX_METADATA_CHARS
from loraplex.adapters_store.records import EndpointRecord


class Place:
    def __init__(self, kind: str, tmp_path: Path, request) -> None:
        self.kind = kind
        if kind == "directory":
            self.where, self.blobs = tmp_path / "store", None
        else:
            self.where, self.blobs = request.getfixturevalue("postgres_dsn"), tmp_path / "shared"

    def open(self) -> AdapterStore:
        return AdapterStore(self.where, blobs=self.blobs)

    def execute(self, sql: str) -> None:
        if self.kind == "directory":
            with closing(sqlite3.connect(Path(self.where) / "registry.sqlite3", isolation_level=None)) as conn:
                conn.execute(sql)
            return
        import psycopg

        with psycopg.connect(self.where, autocommit=True) as conn:
            conn.execute(sql)


@pytest.fixture(params=["directory", "postgres"])
def place(request, tmp_path) -> Place:
    return Place(request.param, tmp_path, request)


def test_metadata_over_the_bound_is_refused_and_leaves_nothing(place, tiny_adapters, validate):
    with place.open() as store:
        def oversized(directory):
            return {**validate(directory), "base_model": "x" * MAX_METADATA_CHARS}

        with pytest.raises(StoreError) as info:
            store.publish_dir("big", tiny_adapters["attn4"], oversized)
        assert info.value.code == "invalid"
        assert "largest field is 'base_model'" in str(info.value)
        assert store.list() == [] and store.blobs.digests() == set()


def test_the_same_key_returns_the_first_version_even_after_a_reopen(place, tiny_adapters, validate):
    calls = []

    def counted(directory):
        calls.append(directory)
        return validate(directory)

    with place.open() as store:
        first = store.publish_dir("sql", tiny_adapters["attn4"], counted, idempotency_key="k-1")
        assert store.publish_dir("sql", tiny_adapters["attn4"], counted, idempotency_key="k-1") == first
        assert len(calls) == 1  # the retry validated nothing
    with place.open() as store:
        assert store.publish_dir("sql", tiny_adapters["attn4"], counted, idempotency_key="k-1") == first
        assert store.publish_dir("sql", tiny_adapters["attn4"], counted).version == 2
        assert [r.ref for r in store.list()] == ["sql@1", "sql@2"]


@pytest.mark.parametrize("name, source, fragment", [("other", "attn4", "with another adapter name"),
                                                    ("sql", "mlp8", "with other files")])
def test_a_key_reused_for_another_registration_is_refused(place, tiny_adapters, validate, name, source, fragment):
    with place.open() as store:
        store.publish_dir("sql", tiny_adapters["attn4"], validate, idempotency_key="k-2")
        with pytest.raises(StoreError) as info:
            store.publish_dir(name, tiny_adapters[source], validate, idempotency_key="k-2")
        assert info.value.code == "failed_precondition" and fragment in str(info.value)
        assert [r.ref for r in store.list()] == ["sql@1"]


def test_a_key_older_than_a_day_registers_anew(place, tiny_adapters, validate):
    with place.open() as store:
        store.publish_dir("sql", tiny_adapters["attn4"], validate, idempotency_key="k-3")
    place.execute(f"UPDATE idempotency_keys SET created_at = created_at - {IDEMPOTENCY_SECONDS + 60}")
    with place.open() as store:
        assert store.publish_dir("sql", tiny_adapters["attn4"], validate, idempotency_key="k-3").version == 2


def test_concurrent_retries_under_one_key_register_one_version(place, tiny_adapters, validate):
    with place.open() as store:
        barrier = threading.Barrier(4)
        results, errors = [], []

        def slow(directory):
            barrier.wait(timeout=30)  # every retry has passed the first key check before any publishes
            return validate(directory)

        def retry():
            try:
                results.append(store.publish_dir("sql", tiny_adapters["attn4"], slow, idempotency_key="k-4"))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=retry) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert {r.ref for r in results} == {"sql@1"} and len(results) == 4
        assert [r.ref for r in store.list()] == ["sql@1"]
        assert store.blobs.digests() == {results[0].digest}


def test_pages_walk_every_version_and_endpoint_once(place, tiny_adapters, validate):
    with place.open() as store:
        for name in ("b", "a", "c"):
            for key in ("attn4", "mlp8"):
                store.publish_dir(name, tiny_adapters[key], validate)
        for i in range(5):
            store.create_endpoint(EndpointRecord(name=f"ep{i}", adapter="a"))
        seen, after = [], None
        while True:
            page, after = store.list_page(after, 4)
            assert len(page) <= 4
            seen += [r.ref for r in page]
            if after is None:
                break
        assert seen == ["a@1", "a@2", "b@1", "b@2", "c@1", "c@2"]
        names, after = [], None
        while True:
            page, after = store.list_endpoints_page(after, 2)
            names += [e.name for e in page]
            if after is None:
                break
        assert names == [f"ep{i}" for i in range(5)]
        assert store.list_page(None, 6) == (store.list(), None)  # a full last page says there is no more
