"""The Admin API of a real server against hostile registrations: oversized metadata, paged
listings, idempotent retries, confined server paths, a full disk, and echoed input that is cut.

Each case used to break the Admin API for everyone (a 15 MB string in a config made every
listing fail), register twice (a retry after a lost answer), read any path the process could,
or answer UNKNOWN. Now each is refused (or answered) with its own status code, and afterwards the
server still answers every caller.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import grpc
import pytest

from loraplex.clients.client import Client, LoraplexError
from loraplex.v1 import admin_pb2, admin_pb2_grpc

PROMPT = "the quick brown fox"
TEMPLATE_CHARS = 60_000  # a trainer template close to the 64 KiB limit


def _refused(fn, *args, **kwargs) -> LoraplexError:
    with pytest.raises(LoraplexError) as info:
        fn(*args, **kwargs)
    return info.value


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        path = dst / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(config_changes)
        path.write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The only directory the module's server may register from."""
    return tmp_path_factory.mktemp("adapter-root")


@pytest.fixture(scope="module")
def server(module_server_factory, root):
    return module_server_factory(name="bounds", adapter_roots=(root,))


@pytest.fixture
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


# ----------------------------------------------------------------------------- oversized metadata


def test_a_15_mb_string_in_a_config_is_refused_and_every_listing_still_works(client, tiny_adapters, tmp_path):
    client.upload_adapter("fine", tiny_adapters["attn4"])
    huge = _copy(tiny_adapters["attn4"], tmp_path / "huge", base_model_name_or_path="x" * (15 << 20))
    err = _refused(client.upload_adapter, "huge", huge)
    assert err.code == "INVALID_ARGUMENT" and "adapter_config.json is larger than 1048576 bytes" in err.message, err
    long = _copy(tiny_adapters["attn4"], tmp_path / "long", base_model_name_or_path="x" * 100_000)
    err = _refused(client.upload_adapter, "huge", long)
    assert err.code == "INVALID_ARGUMENT", err
    assert "base_model_name_or_path is a string of 100000 characters; the limit is 4096" in err.message, err
    assert "huge" not in {a["name"] for a in client.list_adapters()}
    assert client.get_adapter("fine")["name"] == "fine"
    assert client.generate(PROMPT, adapter="fine", max_new_tokens=4).token_ids


def test_a_template_over_its_limit_is_refused_by_name(client, tiny_adapters, tmp_path):
    big = _copy(tiny_adapters["attn4"], tmp_path / "big")
    (big / "loraplex_template.txt").write_text("Q: {input}\n" + "x" * (70 * 1024))
    err = _refused(client.upload_adapter, "big-template", big)
    assert err.code == "INVALID_ARGUMENT" and "loraplex_template.txt" in err.message, err


def test_listings_come_in_pages_cut_short_before_the_message_limit(server, client, tiny_adapters, tmp_path):
    templated = _copy(tiny_adapters["mlp8"], tmp_path / "templated")
    (templated / "loraplex_template.txt").write_text("Q: {input}\nA:" + "." * TEMPLATE_CHARS)
    for _ in range(20):  # 20 versions of ~60 KB of metadata each: 1.2 MB, over one page's 1 MiB
        client.upload_adapter("wide", templated)
    with grpc.insecure_channel(server.target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        first = admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=1000), timeout=30)
        assert first.next_page_token and first.ByteSize() <= (1 << 20) + 100_000
        rest = admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=1000, page_token=first.next_page_token),
                                  timeout=30)
        refs = [(a.name, a.version) for a in list(first.adapters) + list(rest.adapters)]
        assert refs == sorted(refs) and len(set(refs)) == len(refs)
        assert [v for n, v in refs if n == "wide"] == list(range(1, 21))
        two = admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=2), timeout=30)
        assert len(two.adapters) == 2 and two.next_page_token
        for bad, fragment in ((admin_pb2.ListAdaptersRequest(page_size=5000), "page_size 5000 is over the limit"),
                              (admin_pb2.ListAdaptersRequest(page_token="garbage"), "page_token is not one"),
                              (admin_pb2.ListEndpointsRequest(page_token=two.next_page_token), None)):
            method = admin.ListEndpoints if isinstance(bad, admin_pb2.ListEndpointsRequest) else admin.ListAdapters
            with pytest.raises(grpc.RpcError) as info:
                method(bad, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment is None or fragment in info.value.details()
    listed = client.list_adapters()  # the client walks every page
    assert [a["version"] for a in listed if a["name"] == "wide"] == list(range(1, 21))


def test_endpoint_listings_page_too(client, tiny_adapters, server):
    client.upload_adapter("ep-target", tiny_adapters["rs2"])
    names = [f"ep-{i:02d}" for i in range(7)]
    for name in names:
        client.create_endpoint(name, adapter="ep-target")
    with grpc.insecure_channel(server.target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        seen, token = [], ""
        while True:
            page = admin.ListEndpoints(admin_pb2.ListEndpointsRequest(page_size=3, page_token=token), timeout=30)
            assert len(page.endpoints) <= 3
            seen += [e.name for e in page.endpoints]
            token = page.next_page_token
            if not token:
                break
    assert [n for n in seen if n.startswith("ep-")] == names
    assert [e["name"] for e in client.list_endpoints() if e["name"].startswith("ep-")] == names


# ----------------------------------------------------------------------------- echoed input


def test_a_10k_character_name_is_refused_with_a_message_that_fits(client, tiny_adapters):
    err = _refused(client.upload_adapter, "n" * 10_000, tiny_adapters["attn4"])
    assert err.code == "INVALID_ARGUMENT" and "10000 characters" in err.message and len(err.message) <= 1000, err
    err = _refused(client.get_adapter, "n" * 10_000 + "@1")
    assert err.code == "INVALID_ARGUMENT" and len(err.message) <= 1000, err


# ----------------------------------------------------------------------------- idempotent retries


def test_a_retried_registration_returns_the_first_version(server_factory, tiny_adapters, root, tmp_path):
    source = _copy(tiny_adapters["attn4"], root / "idem-attn4")
    store = tmp_path / "store"
    srv = server_factory(store=store, adapter_roots=(root,))
    with Client(srv.target, timeout=60) as client:
        first = client.upload_adapter("task", source, idempotency_key="retry-1")
        again = client.upload_adapter("task", source, idempotency_key="retry-1")
        assert (first["version"], again["version"]) == (1, 1)
        assert client.register_adapter("task", str(source), idempotency_key="retry-1")["version"] == 1
        other = _refused(client.upload_adapter, "task", tiny_adapters["mlp8"], idempotency_key="retry-1")
        assert other.code == "FAILED_PRECONDITION" and "task@1 with other files" in other.message, other
        assert client.upload_adapter("task", source)["version"] == 2  # a fresh key is a new registration
    srv.proc.kill()  # as if the answer to the next call had been lost with the server
    srv.proc.wait()
    srv = server_factory(store=store, adapter_roots=(root,))
    with Client(srv.target, timeout=60) as client:
        assert client.register_adapter("task", str(source), idempotency_key="retry-1")["version"] == 1
        assert [a["version"] for a in client.list_adapters()] == [1, 2]
        client.delete_adapter("task@1")
        gone = _refused(client.register_adapter, "task", str(source), idempotency_key="retry-1")
        assert gone.code == "FAILED_PRECONDITION" and "since been deleted" in gone.message, gone
        bad = _refused(client.register_adapter, "task", str(source), idempotency_key="has space")
        assert bad.code == "INVALID_ARGUMENT" and "idempotency key" in bad.message, bad


# ----------------------------------------------------------------------------- confined server paths


def test_server_paths_are_confined_to_the_adapter_roots(client, tiny_adapters, root, tmp_path):
    inside = _copy(tiny_adapters["attn4"], root / "inside")
    assert client.register_adapter("confined", str(inside))["version"] == 1
    outside = _copy(tiny_adapters["attn4"], tmp_path / "outside")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    absent = tmp_path / "absent"
    for path in (outside, root / "escape", absent, Path("/etc"), Path("/proc/self/attr"), root / ".." / "x"):
        err = _refused(client.register_adapter, "probe", str(path))
        assert err.code == "PERMISSION_DENIED", (path, err)
        assert "outside this server's adapter roots" in err.message
        assert "exist" not in err.message and "directory" not in err.message.split(";")[0]  # says nothing of it
    err = _refused(client.register_adapter, "probe", "relative/dir")
    assert err.code == "INVALID_ARGUMENT" and "absolute" in err.message, err
    assert "probe" not in {a["name"] for a in client.list_adapters()}


def test_without_an_adapter_root_only_uploads_register(server_factory, tiny_adapters):
    srv = server_factory(name="uploads-only", adapter_roots=())
    with Client(srv.target, timeout=60) as client:
        err = _refused(client.register_adapter, "x", str(tiny_adapters["attn4"]))
        assert err.code == "FAILED_PRECONDITION" and "--adapter-root" in err.message, err
        assert client.upload_adapter("x", tiny_adapters["attn4"])["version"] == 1


# ----------------------------------------------------------------------------- a full disk


def test_an_upload_the_disk_cannot_hold_is_resource_exhausted_and_leaves_nothing(server_factory, tiny_adapters,
                                                                                 tmp_path, api):
    """The server's file-size limit is lowered while it runs (RLIMIT_FSIZE: writes past it fail
    with EFBIG, as writes to a full disk fail with ENOSPC; both are answered alike)."""
    store = tmp_path / "store"
    srv = server_factory(store=store)
    with Client(srv.target, timeout=60) as client:
        before = client.generate(PROMPT, max_new_tokens=8, temperature=0.0).token_ids
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        big = _copy(tiny_adapters["attn4"], tmp_path / "big")
        (big / "README.md").write_bytes(b"x" * (2 << 20))
        err = _refused(client.upload_adapter, "big", big)
        assert err.code == "RESOURCE_EXHAUSTED" and "out of space" in err.message and str(store) not in err.message
        # the staging copy goes as the call's handler unwinds, just after the status is sent
        api.wait_until(lambda: not list((store / "staging").iterdir()), timeout=10, what="staging emptied")
        assert "big" not in {a["name"] for a in client.list_adapters()}
        assert client.upload_adapter("small", tiny_adapters["rs2"])["version"] == 1
        assert client.generate(PROMPT, max_new_tokens=8, temperature=0.0).token_ids == before


def test_writing_to_a_full_device_maps_to_resource_exhausted():
    """ENOSPC itself, from /dev/full, through the mapping the upload path uses."""
    from loraplex.server.api.admin_service import os_error

    with pytest.raises(OSError) as info:
        with open("/dev/full", "wb") as full:
            full.write(b"x" * 4096)
            full.flush()
            os.fsync(full.fileno())
    assert os_error(info.value).code == "RESOURCE_EXHAUSTED"
