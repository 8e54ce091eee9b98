"""Two `loraplex serve` processes on one PostgreSQL registry and one blob directory, as two
replicas: an adapter registered on the first is served by the second within a stated bound,
an endpoint created on one is callable on the other, and a delete is seen by both."""
from __future__ import annotations

import time

import pytest

from loraplex.clients.client import Client, LoraplexError

POLL_S = 0.5
# the bound the test holds the second replica to: one poll interval, plus validating and loading
# a tiny adapter and the test's own polling (generous for a loaded 2-core machine)
VISIBLE_WITHIN_S = POLL_S + 10.0


def _served(client: Client, **where) -> list[int] | None:
    try:
        return client.generate("hello world", max_new_tokens=4, ignore_eos=True, **where).token_ids
    except LoraplexError as exc:
        if exc.code in ("NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION"):
            return None
        raise


def test_two_replicas_share_one_registry(server_factory, postgres_dsn, tmp_path, tiny_adapters, api):
    shared = ["--blobs", str(tmp_path / "blobs"), "--registry-poll-seconds", str(POLL_S)]
    first = server_factory(*shared, store=postgres_dsn, name="replica-a")
    second = server_factory(*shared, store=postgres_dsn, name="replica-b")
    with Client(first.target, timeout=60) as a, Client(second.target, timeout=60) as b:
        a.upload_adapter("sum", tiny_adapters["mlp8"])  # from this machine: the server keeps its own copy
        registered = time.monotonic()
        expected = a.generate("hello world", adapter="sum", max_new_tokens=4, ignore_eos=True).token_ids
        seen = api.wait_until(lambda: _served(b, adapter="sum"), timeout=VISIBLE_WITHIN_S,
                              what="the second replica to serve the adapter")
        assert time.monotonic() - registered < VISIBLE_WITHIN_S
        assert seen == expected
        assert [(r["name"], r["version"]) for r in b.list_adapters()] == [("sum", 1)]

        b.create_endpoint("summary", adapter="sum")
        assert a.generate("hello world", endpoint="summary", max_new_tokens=4, ignore_eos=True).token_ids == expected

        b.upload_adapter("sum", tiny_adapters["all16"])  # version 2, registered on the other replica
        b.update_endpoint("summary", adapter="sum@2")
        v2 = api.wait_until(lambda: _served(a, endpoint="summary"), timeout=VISIBLE_WITHIN_S,
                            what="the first replica to serve sum@2 through the endpoint")
        assert v2 == b.generate("hello world", adapter="sum@2", max_new_tokens=4, ignore_eos=True).token_ids
        assert v2 != expected

        b.delete_endpoint("summary")
        a.delete_adapter("sum")
        for client in (a, b):
            with pytest.raises(LoraplexError) as info:
                client.generate("hello world", adapter="sum", max_new_tokens=2)
            assert info.value.code == "NOT_FOUND"
        assert b.list_adapters() == []
        # the second replica drops its engine registrations too (the registered-adapters gauge follows)
        api.wait_until(lambda: api.metric(api.scrape(second), "loraplex_registered_adapters") == 0,
                       timeout=VISIBLE_WITHIN_S, what="the second replica's gauge to drop to zero")


def test_a_replica_refuses_to_start_without_blobs_or_database(server_factory, postgres_dsn, tmp_path):
    with pytest.raises(RuntimeError, match="needs --blobs"):
        server_factory(store=postgres_dsn, name="no-blobs")
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        server_factory("--blobs", str(tmp_path / "b"), store="postgresql://x:secret@127.0.0.1:1/db", name="no-db")
    assert "cannot reach the registry database postgresql://127.0.0.1:1/db" in str(info.value)
    assert "secret" not in str(info.value)
