"""The sync and asyncio clients against the in-test fake server (tests/clients/conftest.py)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from loraplex.clients.aio import AsyncClient
from loraplex.clients.client import Client, LoraplexError

OPTIONAL_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")


def test_unset_sampling_fields_stay_unset(fake_server):
    with Client(fake_server.target) as client:
        client.generate("hi")
    sampling = fake_server.inference.requests[-1].sampling
    assert [f for f in OPTIONAL_SAMPLING if sampling.HasField(f)] == []
    assert list(sampling.stop) == []


def test_zero_values_are_sent_as_present(fake_server):
    with Client(fake_server.target) as client:
        client.generate("hi", temperature=0.0, top_k=0, seed=0, ignore_eos=False, max_new_tokens=5, stop="\n")
    sampling = fake_server.inference.requests[-1].sampling
    assert sampling.HasField("temperature") and sampling.temperature == 0.0
    assert sampling.HasField("top_k") and sampling.top_k == 0
    assert sampling.HasField("seed") and sampling.HasField("ignore_eos") and not sampling.ignore_eos
    assert sampling.max_new_tokens == 5 and list(sampling.stop) == ["\n"]
    assert not sampling.HasField("top_p")


def test_generate_request_and_completion(fake_server):
    with Client(fake_server.target) as client:
        result = client.generate(messages=[{"role": "user", "content": "hello"}], adapter="sql",
                                 soft_prompt="polite@3", request_id="r-7")
    request = fake_server.inference.requests[-1]
    assert request.WhichOneof("input") == "chat" and request.chat.messages[0].content == "hello"
    assert (request.adapter, request.soft_prompt, request.endpoint, request.request_id) == ("sql", "polite@3", "", "r-7")
    assert result.text == " you said hello" and result.token_ids == [ord(c) for c in result.text]
    assert result.finish_reason == "stop" and result.request_id == "r-7"
    assert (result.prompt_tokens, result.completion_tokens) == (3, len(result.text))
    assert (result.adapter, result.soft_prompt, result.endpoint) == ("sql@1", "polite@3", "")


def test_prompt_and_messages_are_exclusive(fake_server):
    with Client(fake_server.target) as client:
        with pytest.raises(ValueError, match="exactly one"):
            client.generate("hi", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(ValueError, match="exactly one"):
            client.stream()
    assert fake_server.inference.requests == []


def test_auth_metadata(fake_server):
    with Client(fake_server.target, api_key="k-123", admin_token="adm-9") as client:
        client.generate("hi")
        client.list_adapters()
    inference_md, admin_md = fake_server.inference.metadata[-1], fake_server.admin.metadata[-1]
    assert inference_md["authorization"] == "Bearer k-123" and "x-admin-token" not in inference_md
    assert admin_md["x-admin-token"] == "adm-9" and "authorization" not in admin_md

    with Client(fake_server.target) as client:
        client.generate("hi")
        client.list_adapters()
    assert "authorization" not in fake_server.inference.metadata[-1]
    assert "x-admin-token" not in fake_server.admin.metadata[-1]


def test_stream_assembly(fake_server):
    with Client(fake_server.target) as client:
        events = list(client.stream("streaming", endpoint="sql-task", temperature=0.0))
    assert fake_server.inference.requests[-1].sampling.HasField("temperature")
    *deltas, end = events
    assert len(deltas) > 1 and not any(e.is_final for e in deltas)
    assert "".join(e.text for e in deltas) == " you said streaming"
    assert [t for e in deltas for t in e.token_ids] == [ord(c) for c in " you said streaming"]
    assert end.is_final and end.finish_reason == "length" and end.text == "" and end.token_ids == []
    assert (end.prompt_tokens, end.completion_tokens) == (3, len(" you said streaming"))
    for event in events:
        assert event.request_id == "req-1"
        assert (event.served_by.endpoint, event.served_by.adapter) == ("sql-task", "sql@2")


def test_upload_chunks_reassemble(fake_server, adapter_dir):
    with Client(fake_server.target, admin_token="t") as client:
        info = client.upload_adapter("sql", adapter_dir.path, chunk_size=7)
    first, *chunks = fake_server.admin.uploads[-1]
    assert first.WhichOneof("part") == "name" and first.name == "sql"
    assert all(m.WhichOneof("part") == "chunk" and len(m.chunk.data) <= 7 for m in chunks)
    received: dict[str, bytes] = {}
    for m in chunks:
        received[m.chunk.path] = received.get(m.chunk.path, b"") + m.chunk.data
    assert received == adapter_dir.files
    expected_chunks = sum(max(1, -(-len(data) // 7)) for data in adapter_dir.files.values())
    assert len(chunks) == expected_chunks
    assert fake_server.admin.metadata[-1]["x-admin-token"] == "t"
    assert info["name"] == "sql" and info["version"] == 1
    assert info["size_bytes"] == str(sum(map(len, adapter_dir.files.values())))  # uint64: a JSON string


def test_upload_refuses_subdirectory_and_symlink(fake_server, adapter_dir):
    with Client(fake_server.target) as client:
        (adapter_dir.path / "nested").mkdir()
        with pytest.raises(ValueError, match="subdirectory"):
            client.upload_adapter("sql", adapter_dir.path)
        (adapter_dir.path / "nested").rmdir()
        (adapter_dir.path / "link").symlink_to(adapter_dir.path / "README.md")
        with pytest.raises(ValueError, match="symlink"):
            client.upload_adapter("sql", adapter_dir.path)
        with pytest.raises(ValueError, match="not a directory"):
            client.upload_adapter("sql", adapter_dir.path / "missing")
    assert fake_server.admin.uploads == []


def test_server_error_becomes_loraplex_error(fake_server):
    with Client(fake_server.target) as client:
        with pytest.raises(LoraplexError) as caught:
            client.generate("hi", endpoint="missing")
        assert (caught.value.code, caught.value.message) == ("NOT_FOUND", "unknown endpoint 'missing'")
        with pytest.raises(LoraplexError) as caught:
            list(client.stream("hi", endpoint="missing"))
        assert caught.value.code == "NOT_FOUND"
        with pytest.raises(LoraplexError, match="NOT_FOUND: unknown adapter 'nope'"):
            client.get_adapter("nope")


def test_unreachable_server_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(LoraplexError) as caught:
            client.server_info()
    assert caught.value.code == "UNAVAILABLE"


def test_endpoint_admin_round_trip(fake_server):
    with Client(fake_server.target) as client:
        created = client.create_endpoint("sql-task", adapter="sql", template="Q: {input}\nA:",
                                         defaults={"temperature": 0.0, "stop": ["\n"]}, max_new_tokens_cap=64,
                                         canary=("sql@2", 0.25))
        sent = fake_server.admin.endpoint_requests[-1]
        assert sent.defaults.HasField("temperature") and not sent.defaults.HasField("top_p")
        assert sent.HasField("max_new_tokens_cap") and sent.canary.adapter == "sql@2"
        assert created["defaults"] == {"temperature": 0.0, "stop": ["\n"]}
        assert created["canary"] == {"adapter": "sql@2", "weight": 0.25}
        assert created["template"] == "Q: {input}\nA:" and created["system_message"] == ""

        client.update_endpoint("sql-task", adapter="sql@3")
        sent = fake_server.admin.endpoint_requests[-1]
        assert not sent.HasField("canary") and not sent.HasField("max_new_tokens_cap") and sent.template == ""
        with pytest.raises(ValueError, match="defaults"):
            client.create_endpoint("bad", defaults={"temprature": 1.0})

        assert [e["name"] for e in client.list_endpoints()] == ["sql-task"]
        assert client.get_endpoint("sql-task")["adapter"] == "sql@3"
        assert client.delete_endpoint("sql-task") is None
        assert client.list_endpoints() == []


def test_adapter_admin_round_trip(fake_server, adapter_dir):
    with Client(fake_server.target) as client:
        client.register_adapter("sql", "/srv/adapters/sql")
        assert fake_server.admin.registered[-1].path == "/srv/adapters/sql"
        assert [a["name"] for a in client.list_adapters()] == ["sql"]
        assert client.pin("sql")["pinned"] is True
        assert client.unpin("sql@1")["pinned"] is False
        assert client.server_info()["resident_adapters"] == ["sql@1"]
        assert [a["version"] for a in client.delete_adapter("sql")] == [1]
        assert client.list_adapters() == []


def test_async_client(fake_server, adapter_dir):
    async def scenario():
        async with AsyncClient(fake_server.target, api_key="k", admin_token="t") as client:
            result = await client.generate("hi", temperature=0.0)
            events = [e async for e in client.stream("streamed")]
            info = await client.upload_adapter("sql", adapter_dir.path, chunk_size=5)
            adapters = await client.list_adapters()
            with pytest.raises(LoraplexError) as caught:
                await client.generate("hi", endpoint="missing")
            with pytest.raises(LoraplexError) as stream_caught:
                _ = [e async for e in client.stream("hi", endpoint="missing")]
            return result, events, info, adapters, caught.value, stream_caught.value

    result, events, info, adapters, error, stream_error = asyncio.run(scenario())
    first_request = fake_server.inference.requests[0]
    assert first_request.sampling.HasField("temperature") and not first_request.sampling.HasField("top_k")
    assert result.text == " you said hi" and result.finish_reason == "stop"
    assert "".join(e.text for e in events) == " you said streamed" and events[-1].finish_reason == "length"
    assert fake_server.inference.metadata[0]["authorization"] == "Bearer k"
    assert fake_server.admin.metadata[0]["x-admin-token"] == "t"
    received: dict[str, bytes] = {}
    for m in fake_server.admin.uploads[-1][1:]:
        received[m.chunk.path] = received.get(m.chunk.path, b"") + m.chunk.data
    assert received == adapter_dir.files and info["name"] == "sql"
    assert [a["name"] for a in adapters] == ["sql"]
    assert (error.code, error.message) == ("NOT_FOUND", "unknown endpoint 'missing'")
    assert stream_error.code == "NOT_FOUND"
