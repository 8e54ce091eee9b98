from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraplex.adapters_store import AdapterStore, StoreError
from loraplex.server.engine.adapter_errors import AdapterError


def assert_empty(store: AdapterStore) -> None:
    """No row, no blob, nothing in staging."""
    assert store.list() == []
    assert os.listdir(store.root / "blobs") == []
    assert os.listdir(store.root / "staging") == []


def test_store_layout(store):
    for name in ("registry.sqlite3", "blobs", "staging"):
        assert (store.root / name).exists()


def test_publish_then_get_and_list(store, tiny_adapters, validate):
    rec = store.publish_dir("sql", tiny_adapters["attn4"], validate)
    assert (rec.name, rec.version, rec.kind, rec.ref) == ("sql", 1, "lora", "sql@1")
    assert rec.metadata["max_rank"] == 4
    assert rec.blob_dir == store.root / "blobs" / rec.digest
    assert sorted(os.listdir(rec.blob_dir)) == sorted(os.listdir(tiny_adapters["attn4"]))
    assert rec.size_bytes == sum(p.stat().st_size for p in Path(tiny_adapters["attn4"]).iterdir())
    assert store.get("sql") == rec
    assert store.get("sql@1") == rec
    assert store.list() == [rec]
    assert store.versions("sql") == [rec]
    assert os.listdir(store.root / "staging") == []

    soft = store.publish_dir("persona", tiny_adapters["soft"], validate)
    assert soft.kind == "soft_prompt"
    assert soft.metadata["num_virtual_tokens"] == 5
    assert [r.ref for r in store.list()] == ["persona@1", "sql@1"]


def test_publish_from_staging(store, tiny_adapters, validate):
    with store.staging() as staged:
        assert staged.parent == store.root / "staging"
        assert os.listdir(staged) == []
        for f in Path(tiny_adapters["mlp8"]).iterdir():
            (staged / f.name).write_bytes(f.read_bytes())
        rec = store.publish("mlp", staged, validate)
    assert store.get("mlp") == rec
    assert os.listdir(store.root / "staging") == []


def test_publish_refuses_a_directory_outside_staging(store, tiny_adapters, validate):
    with pytest.raises(ValueError, match="staging"):
        store.publish("x", tiny_adapters["attn4"], validate)


def test_second_publish_is_the_next_version(store, tiny_adapters, validate):
    v1 = store.publish_dir("sql", tiny_adapters["attn4"], validate)
    v2 = store.publish_dir("sql", tiny_adapters["mlp8"], validate)
    assert v2.version == 2 and v2.digest != v1.digest
    assert store.get("sql") == v2
    assert store.get("sql@1") == v1
    assert store.versions("sql") == [v1, v2]
    with pytest.raises(StoreError) as info:
        store.get("sql@3")
    assert info.value.code == "not_found"
    assert "'sql@3' not found (its versions are 1, 2)" in str(info.value)


def test_missing_adapter_is_not_found(store):
    for call in (lambda: store.get("nope"), lambda: store.versions("nope"), lambda: store.delete("nope")):
        with pytest.raises(StoreError, match="adapter 'nope' not found") as info:
            call()
        assert info.value.code == "not_found"


def test_identical_content_shares_one_blob(store, tiny_adapters, validate):
    a = store.publish_dir("a", tiny_adapters["attn4"], validate)
    b = store.publish_dir("b", tiny_adapters["attn4"], validate)
    again = store.publish_dir("a", tiny_adapters["attn4"], validate)
    assert a.digest == b.digest == again.digest and again.version == 2
    assert os.listdir(store.root / "blobs") == [a.digest]
    assert os.listdir(store.root / "staging") == []


def test_digest_covers_file_names(store, copy_adapter, validate):
    src = copy_adapter("attn4")
    first = store.publish_dir("a", src, validate)
    (src / "notes.txt").write_text("v2")
    second = store.publish_dir("a", src, validate)
    assert first.digest != second.digest


def test_blob_files_are_read_only(store, tiny_adapters, validate):
    rec = store.publish_dir("a", tiny_adapters["attn4"], validate)
    for f in rec.blob_dir.iterdir():
        assert f.stat().st_mode & 0o222 == 0


def test_pickle_only_directory_leaves_nothing(store, copy_adapter, validate):
    src = copy_adapter("attn4")
    weights = src / "adapter_model.safetensors"
    (src / "adapter_model.bin").write_bytes(weights.read_bytes())
    weights.unlink()
    with pytest.raises(StoreError) as info:
        store.publish_dir("a", src, validate)
    assert info.value.code == "invalid"
    assert "'adapter_model.bin' is a pickle-capable format" in str(info.value)
    assert_empty(store)


def test_pickle_beside_safetensors_is_refused_too(store, copy_adapter, validate):
    src = copy_adapter("attn4")
    (src / "training_args.pt").write_bytes(b"\x80\x04")
    with pytest.raises(StoreError, match="'training_args.pt' is a pickle-capable format"):
        store.publish_dir("a", src, validate)
    assert_empty(store)


def test_validator_error_propagates_and_leaves_nothing(store, copy_adapter, validate):
    src = copy_adapter("attn4")
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="truncated"):
        store.publish_dir("a", src, validate)
    assert_empty(store)
    # The version counter did not move either.
    assert store.publish_dir("a", copy_adapter("attn4", "good"), validate).version == 1


def test_shape_mismatch_is_refused(store, builders, tmp_path, validate):
    other = builders.llama(tmp_path / "wide", hidden_size=32, intermediate_size=64)
    src = builders.lora(other, tmp_path / "wide-lora", ["q_proj"], r=2, alpha=2, seed=0)
    with pytest.raises(AdapterError, match="base layer needs"):
        store.publish_dir("a", src, validate)
    assert_empty(store)


def test_rank_limit_comes_from_the_validator(store, tiny_adapters, validate):
    from loraplex.server.engine.adapter_format import BaseModelShape
    from loraplex.server.engine.adapters import inspect_adapter

    del validate
    shape = BaseModelShape(2, 64, {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
                                   "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)})
    with pytest.raises(AdapterError, match="exceeds the server's --max-lora-rank 8"):
        store.publish_dir("a", tiny_adapters["all16"], lambda d: inspect_adapter(d, shape, max_rank=8))
    assert_empty(store)


def test_size_limit(tmp_path, tiny_adapters, validate):
    with AdapterStore(tmp_path / "small", max_adapter_bytes=1000) as small:
        with pytest.raises(StoreError, match="over the limit of 1000 bytes") as info:
            small.publish_dir("a", tiny_adapters["attn4"], validate)
        assert info.value.code == "invalid"
        assert_empty(small)


def test_invalid_name_is_refused_before_anything_is_copied(store, tiny_adapters, validate):
    with pytest.raises(StoreError, match="invalid adapter name '../x'"):
        store.publish_dir("../x", tiny_adapters["attn4"], validate)
    assert_empty(store)


def test_symlink_and_subdirectory_are_refused_by_name(store, copy_adapter, tmp_path, validate):
    src = copy_adapter("attn4")
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", src / "notes.txt")
    (src / "checkpoint-10").mkdir()
    (src / ".DS_Store").write_text("")
    with pytest.raises(StoreError) as info:
        store.publish_dir("a", src, validate)
    message = str(info.value)
    assert info.value.code == "invalid"
    assert "refused 3 entries" in message
    assert "'notes.txt' is a symlink" in message
    assert "'checkpoint-10' is a subdirectory" in message
    assert "'.DS_Store'" in message
    assert_empty(store)


def test_source_that_is_not_a_directory(store, tmp_path, validate):
    with pytest.raises(StoreError, match="no such directory"):
        store.publish_dir("a", tmp_path / "missing", validate)
    os.symlink(tmp_path, tmp_path / "link")
    with pytest.raises(StoreError, match="not a directory"):
        store.publish_dir("a", tmp_path / "link", validate)


def test_empty_directory_is_refused(store, tmp_path, validate):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="the directory is empty"):
        store.publish_dir("a", tmp_path / "empty", validate)


def test_callback_must_name_a_kind(store, tiny_adapters):
    with pytest.raises(TypeError, match="'kind'"):
        store.publish_dir("a", tiny_adapters["attn4"], lambda d: {"ranks": {}})
    assert_empty(store)


def test_adapters_survive_a_restart(tmp_path, tiny_adapters, validate):
    with AdapterStore(tmp_path / "s") as first:
        a1 = first.publish_dir("a", tiny_adapters["attn4"], validate)
        a2 = first.publish_dir("a", tiny_adapters["rs2"], validate)
        soft = first.publish_dir("soft", tiny_adapters["soft"], validate)
    with AdapterStore(tmp_path / "s") as second:
        assert second.list() == [a1, a2, soft]
        assert second.get("a") == a2
        assert second.publish_dir("a", tiny_adapters["mlp8"], validate).version == 3


def test_closed_store_refuses_calls(tmp_path):
    s = AdapterStore(tmp_path / "s")
    s.close()
    with pytest.raises(StoreError) as info:
        s.list()
    assert info.value.code == "failed_precondition"


def test_store_from_a_newer_schema_is_refused(tmp_path):
    import sqlite3

    AdapterStore(tmp_path / "s").close()
    with sqlite3.connect(tmp_path / "s" / "registry.sqlite3") as conn:
        conn.execute("UPDATE store_meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99") as info:
        AdapterStore(tmp_path / "s")
    assert info.value.code == "failed_precondition"
