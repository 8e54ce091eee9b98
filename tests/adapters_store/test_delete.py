from __future__ import annotations

import os

import pytest

from loraplex.adapters_store import EndpointRecord, StoreError


def blobs(store) -> set[str]:
    return set(os.listdir(store.root / "blobs"))


def test_delete_one_version_or_all(store, tiny_adapters, validate):
    v1 = store.publish_dir("sql", tiny_adapters["attn4"], validate)
    v2 = store.publish_dir("sql", tiny_adapters["mlp8"], validate)
    v3 = store.publish_dir("sql", tiny_adapters["rs2"], validate)
    assert store.delete("sql@2") == [v2]
    assert store.versions("sql") == [v1, v3]
    assert blobs(store) == {v1.digest, v3.digest}
    assert store.delete("sql") == [v1, v3]
    assert store.list() == [] and blobs(store) == set()


def test_versions_are_never_reused(store, tiny_adapters, validate):
    store.publish_dir("sql", tiny_adapters["attn4"], validate)
    store.publish_dir("sql", tiny_adapters["mlp8"], validate)
    store.delete("sql@2")
    assert store.publish_dir("sql", tiny_adapters["rs2"], validate).version == 3
    store.delete("sql")
    assert store.publish_dir("sql", tiny_adapters["rs2"], validate).version == 4


def test_delete_missing_version_is_not_found(store, tiny_adapters, validate):
    store.publish_dir("sql", tiny_adapters["attn4"], validate)
    with pytest.raises(StoreError, match=r"'sql@5' not found \(its versions are 1\)") as info:
        store.delete("sql@5")
    assert info.value.code == "not_found"


def test_shared_blob_goes_only_with_its_last_user(store, tiny_adapters, validate):
    a = store.publish_dir("a", tiny_adapters["attn4"], validate)
    store.publish_dir("b", tiny_adapters["attn4"], validate)
    store.delete("a")
    assert blobs(store) == {a.digest}
    assert store.get("b").blob_dir.is_dir()
    store.delete("b")
    assert blobs(store) == set()


def test_delete_refused_while_an_endpoint_uses_it(store, tiny_adapters, validate):
    store.publish_dir("sql", tiny_adapters["attn4"], validate)
    store.publish_dir("sql", tiny_adapters["mlp8"], validate)
    store.publish_dir("persona", tiny_adapters["soft"], validate)
    store.create_endpoint(EndpointRecord("main", adapter="sql@2", canary_adapter="sql@1", canary_weight=0.1))
    store.create_endpoint(EndpointRecord("chat", soft_prompt="persona"))

    for ref, fragment in [("sql@1", "'main' (canary_adapter)"), ("sql@2", "'main' (adapter)"),
                          ("sql", "'main' (adapter), 'main' (canary_adapter)"), ("persona", "'chat' (soft_prompt)")]:
        with pytest.raises(StoreError) as info:
            store.delete(ref)
        assert info.value.code == "failed_precondition"
        assert fragment in str(info.value)
    assert len(store.list()) == 3 and len(blobs(store)) == 3

    store.update_endpoint(EndpointRecord("main", adapter="sql@2"))
    assert [r.ref for r in store.delete("sql@1")] == ["sql@1"]
    with pytest.raises(StoreError, match="'main' \\(adapter\\)"):
        store.delete("sql")
    store.delete_endpoint("main")
    store.delete_endpoint("chat")
    assert [r.ref for r in store.delete("sql")] == ["sql@2"]
    assert [r.ref for r in store.delete("persona")] == ["persona@1"]
    assert store.list() == [] and blobs(store) == set()
