from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from loraplex.adapters_store import EndpointRecord


def test_concurrent_publishes_get_distinct_versions(store, tiny_adapters, validate):
    sources = [tiny_adapters[k] for k in ("attn4", "mlp8", "all16", "attn4")]
    barrier = threading.Barrier(len(sources))

    def publish(source):
        barrier.wait()
        return store.publish_dir("sql", source, validate)

    with ThreadPoolExecutor(len(sources)) as pool:
        records = list(pool.map(publish, sources))
    assert sorted(r.version for r in records) == [1, 2, 3, 4]
    assert [r.version for r in store.versions("sql")] == [1, 2, 3, 4]
    assert len({r.digest for r in records}) == 3
    for rec in records:
        assert rec.blob_dir.is_dir()


def test_readers_see_each_endpoint_update_whole(store, tiny_adapters, validate):
    store.publish_dir("sql", tiny_adapters["attn4"], validate)
    store.publish_dir("sql", tiny_adapters["mlp8"], validate)
    versions = {"sql@1": {"top_k": 1}, "sql@2": {"top_k": 2}}
    store.create_endpoint(EndpointRecord("e", adapter="sql@1", defaults=versions["sql@1"]))
    stop = threading.Event()
    seen: list[tuple[str, dict]] = []

    def read():
        while not stop.is_set():
            ep = store.get_endpoint("e")
            seen.append((ep.adapter, ep.defaults))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            ref = f"sql@{i % 2 + 1}"
            store.update_endpoint(EndpointRecord("e", adapter=ref, defaults=versions[ref]))
    finally:
        stop.set()
        reader.join()
    assert seen and all(defaults == versions[adapter] for adapter, defaults in seen)


def test_two_store_objects_on_one_directory(tmp_path, tiny_adapters, validate):
    """Two connections (as two processes would have) still allocate versions without clashes."""
    from loraplex.adapters_store import AdapterStore

    first, second = AdapterStore(tmp_path / "s"), AdapterStore(tmp_path / "s")
    try:
        jobs = [(first, "attn4"), (second, "mlp8"), (first, "rs2"), (second, "attn4")]
        barrier = threading.Barrier(len(jobs))

        def publish(job):
            store, key = job
            barrier.wait()
            return store.publish_dir("sql", tiny_adapters[key], validate).version

        with ThreadPoolExecutor(len(jobs)) as pool:
            assert sorted(pool.map(publish, jobs)) == [1, 2, 3, 4]
        assert first.list() == second.list()
    finally:
        first.close()
        second.close()
