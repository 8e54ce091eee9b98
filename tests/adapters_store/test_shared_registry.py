"""The shared registry: PostgreSQL metadata (a real server, see `postgres_server` in
tests/conftest.py) with blobs in a shared directory or behind an fsspec URL, opened by several
store objects at once as several replicas would."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from loraplex.adapters_store import AdapterStore, EndpointRecord, StoreError
from loraplex.adapters_store.remote_blobs import COMPLETE


@pytest.fixture(params=["shared-dir", "url"])
def replicas(request, postgres_dsn, tmp_path):
    """open() -> a new store object on the same registry, as another replica would have."""
    blobs = str(tmp_path / "shared") if request.param == "shared-dir" else (tmp_path / "bucket").as_uri()
    opened = []

    def open_replica() -> AdapterStore:
        store = AdapterStore(postgres_dsn, blobs=blobs, cache=tmp_path / f"cache-{len(opened)}")
        opened.append(store)
        return store

    yield open_replica
    for store in opened:
        store.close()


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_registration_on_one_replica_is_seen_by_another(replicas, tiny_adapters, validate):
    first, second = replicas(), replicas()
    rec = first.publish_dir("sum", tiny_adapters["mlp8"], validate)
    seen = second.get("sum")
    assert (seen.ref, seen.digest, seen.kind) == ("sum@1", rec.digest, "lora")
    assert _files(second.local_dir(seen)) == _files(Path(tiny_adapters["mlp8"]))
    assert second.publish_dir("sum", tiny_adapters["all16"], validate).ref == "sum@2"
    assert [r.ref for r in first.versions("sum")] == ["sum@1", "sum@2"]


def test_concurrent_publishes_from_two_replicas_get_distinct_versions(replicas, tiny_adapters, validate):
    stores = [replicas(), replicas()]
    refs, errors = [], []

    def publish(store, key):
        try:
            refs.append(store.publish_dir("x", tiny_adapters[key], validate).ref)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(stores[i % 2], key))
               for i, key in enumerate(["mlp8", "attn4", "all16", "rs2"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(refs) == ["x@1", "x@2", "x@3", "x@4"]
    assert [r.ref for r in stores[1].list()] == ["x@1", "x@2", "x@3", "x@4"]


def test_endpoints_and_deletes_are_shared(replicas, tiny_adapters, validate):
    first, second = replicas(), replicas()
    first.publish_dir("sum", tiny_adapters["mlp8"], validate)
    second.create_endpoint(EndpointRecord(name="summary", adapter="sum"))
    assert first.get_endpoint("summary").adapter == "sum@1"
    with pytest.raises(StoreError) as info:
        first.delete("sum")
    assert info.value.code == "failed_precondition" and "summary" in info.value.message
    second.delete_endpoint("summary")
    assert [r.ref for r in first.delete("sum")] == ["sum@1"]
    with pytest.raises(StoreError) as info:
        second.get("sum")
    assert info.value.code == "not_found"


def test_identical_content_shares_one_blob_until_the_last_version_goes(replicas, tiny_adapters, validate, tmp_path):
    first, second = replicas(), replicas()
    a = first.publish_dir("a", tiny_adapters["mlp8"], validate)
    b = second.publish_dir("b", tiny_adapters["mlp8"], validate)
    assert a.digest == b.digest
    first.delete("a")
    assert _files(second.local_dir(second.get("b"))) == _files(Path(tiny_adapters["mlp8"]))
    second.delete("b")
    assert a.digest not in first._blobs.digests()


def test_an_empty_or_unused_registry_beside_shared_blobs_refuses_and_touches_nothing(
        postgres_dsn, new_database, tmp_path, tiny_adapters, validate, tree):
    """A replica started against an empty or mistyped database must not take the shared blobs for
    orphans (it used to delete them all): it refuses, and neither the blobs nor that database
    change. (A replica refused at start-up: tests/adapters_store/test_durability.py.)"""
    import psycopg

    shared = tmp_path / "shared"
    with AdapterStore(postgres_dsn, blobs=str(shared)) as store:
        store.publish_dir("a", tiny_adapters["mlp8"], validate)
        store.publish_dir("b", tiny_adapters["attn4"], validate)
    empty, unused = new_database(), new_database()
    AdapterStore(unused, blobs=str(tmp_path / "other-blobs")).close()  # a registry, but not this one's
    before = tree(shared)
    for database, problem in ((empty, "holds no registry tables"),
                              (unused, "has never registered an adapter")):
        with pytest.raises(StoreError) as info:
            AdapterStore(database, blobs=str(shared))
        assert info.value.code == "failed_precondition"
        message = info.value.message
        assert problem in message and f"{shared / 'blobs'} holds 2 adapter blob(s)" in message, message
        assert "nothing was changed" in message and "loraplex store rebuild" in message, message
        assert "loraplex_ci:" not in message  # never the password
        assert tree(shared) == before
    with psycopg.connect(empty) as conn:
        assert conn.execute("SELECT count(*) FROM information_schema.tables "
                            "WHERE table_schema = current_schema()").fetchone() == (0,)
    with AdapterStore(postgres_dsn, blobs=str(shared)) as store:
        assert [r.ref for r in store.list()] == ["a@1", "b@1"]


def test_bucket_blobs_are_complete_before_they_count(replicas, tiny_adapters, validate, tmp_path):
    store = replicas()
    rec = store.publish_dir("sum", tiny_adapters["mlp8"], validate)
    bucket = tmp_path / "bucket"
    if not bucket.exists():  # the shared-directory variant has no bucket
        assert store.local_dir(rec) == tmp_path / "shared" / "blobs" / rec.digest
        return
    assert (bucket / rec.digest / COMPLETE).exists()
    (bucket / rec.digest / COMPLETE).unlink()  # as if the upload had stopped before its marker
    other = replicas()
    with pytest.raises(FileNotFoundError, match="missing"):
        other.local_dir(rec)


def test_an_unreachable_database_is_a_clear_error_without_the_password(tmp_path):
    with pytest.raises(StoreError) as info:
        AdapterStore("postgresql://loraplex:s3cret@127.0.0.1:1/registry", blobs=str(tmp_path / "b"))
    assert info.value.code == "unavailable"
    assert "127.0.0.1:1/registry" in info.value.message and "s3cret" not in info.value.message


def test_blobs_and_store_kinds_must_match(tmp_path):
    with pytest.raises(ValueError, match="needs --blobs"):
        AdapterStore("postgresql://localhost/registry")
    with pytest.raises(ValueError, match="--blobs goes with"):
        AdapterStore(tmp_path / "dir-store", blobs=str(tmp_path / "b"))
