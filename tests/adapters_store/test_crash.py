"""A registration interrupted at any point leaves the store as it was.

Two kinds of interruption: an exception (the store cleans up at once), and a real crash, a
child process that dies with ``os._exit`` mid-publish so no cleanup code runs; the next open
must then remove what it left.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from loraplex.adapters_store import AdapterStore
from loraplex.adapters_store.blobs import BlobStore
from loraplex.adapters_store.sqlite_metadata import SqliteTx

CRASH_EXIT = 17

CHILD = textwrap.dedent(
    """
    import os, sys
    from loraplex.adapters_store import AdapterStore
    from loraplex.adapters_store.blobs import BlobStore
    from loraplex.adapters_store.sqlite_metadata import SqliteTx

    root, source, point = sys.argv[1:]
    place = BlobStore.place

    def crash(*args):
        os._exit(%d)

    if point == "before_rename":
        BlobStore.place = crash
    else:
        BlobStore.place = lambda self, staged, digest: place(self, staged, digest)
        SqliteTx.insert_adapter = crash
    store = AdapterStore(root)
    store.publish_dir("sql", source, lambda d: {"kind": "lora"})
    """
    % CRASH_EXIT
)


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


@pytest.mark.parametrize("point", ["before_rename", "after_rename"])
def test_crash_mid_publish_is_recovered_on_open(tmp_path, tiny_adapters, validate, point):
    root = tmp_path / "s"
    with AdapterStore(root) as store:
        kept = store.publish_dir("other", tiny_adapters["mlp8"], validate)
    child = subprocess.run([sys.executable, "-c", CHILD, str(root), str(tiny_adapters["attn4"]), point],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert child.returncode == CRASH_EXIT, child.stderr

    blobs, staging = listing(root)
    if point == "before_rename":
        assert len(staging) == 1 and blobs == [kept.digest]  # the staged copy was left behind
    else:
        assert len(blobs) == 2 and staging == []  # an orphan blob no row names

    with AdapterStore(root) as reopened:
        assert reopened.list() == [kept]
        assert_clean(reopened, {kept.digest})
        assert reopened.publish_dir("sql", tiny_adapters["attn4"], validate).version == 1


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
