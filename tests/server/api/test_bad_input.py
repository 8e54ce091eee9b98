"""Bad input to a real server: each is refused with its own status code and a clear message,
nothing half-registered stays behind, and afterwards the server is healthy and generates the
same tokens as before."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import grpc
import pytest

from loraplex.clients.client import Client, LoraplexError
from loraplex.v1 import admin_pb2, admin_pb2_grpc

MAX_RANK = 8
MAX_MESSAGE = 1 << 20
MAX_NEW = 64
PROBES = [dict(prompt="the quick brown fox"), dict(prompt="hello world", adapter="good")]


class _Unpickled:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, tiny_adapters, builders) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-adapters")
    # PEFT's legacy format only: a config and a pickled adapter_model.bin
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_adapters["attn4"] / "adapter_config.json", pickled)
    marker = root / "UNPICKLED"
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(_Unpickled(marker)))
    # a real LoRA for a model of another hidden size
    small = builders.llama(root / "small-model", hidden_size=32)
    wrong = builders.lora(small, root / "wrongshape", ["q_proj", "v_proj"], r=4, alpha=8, seed=9)
    # a safetensors file cut in half
    truncated = root / "truncated"
    shutil.copytree(tiny_adapters["attn4"], truncated)
    weights = truncated / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return {"pickled": pickled, "wrongshape": wrong, "truncated": truncated, "rank16": tiny_adapters["all16"],
            "marker": marker}


@pytest.fixture(scope="module")
def server(module_server_factory, tiny_adapters):
    """The server, with one good adapter and the outputs it gave before any bad input."""
    srv = module_server_factory("--max-lora-rank", str(MAX_RANK), "--max-message-bytes", str(MAX_MESSAGE),
                                "--max-new-tokens-limit", str(MAX_NEW), name="bad-input")
    with Client(srv.target, timeout=60) as client:
        client.upload_adapter("good", tiny_adapters["attn4"])
        client.register_adapter("persona", str(tiny_adapters["soft"]))
        client.create_endpoint("task", adapter="good")
        before = [client.generate(max_new_tokens=12, ignore_eos=True, **p) for p in PROBES]
    return srv, before


@pytest.fixture
def client(server):
    with Client(server[0].target, timeout=60) as c:
        yield c


def _refused(fn, *args, **kwargs) -> LoraplexError:
    with pytest.raises(LoraplexError) as info:
        fn(*args, **kwargs)
    return info.value


def _register(client: Client, how: str, name: str, directory: Path):
    if how == "upload":
        return client.upload_adapter(name, directory)
    return client.register_adapter(name, str(directory))


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("how", ["upload", "path"])
def test_pickle_only_adapter_is_refused_and_never_unpickled(client, bad_adapters, how):
    err = _refused(_register, client, how, f"pickled-{how}", bad_adapters["pickled"])
    assert err.code == "INVALID_ARGUMENT"
    assert "never unpickled" in err.message and "adapter_model.bin" in err.message, err.message
    assert not bad_adapters["marker"].exists(), "the server unpickled adapter_model.bin"


@pytest.mark.parametrize("how", ["upload", "path"])
@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "..", "../"])
def test_adapter_name_with_dot_dot_is_refused(client, server, tiny_adapters, how, name):
    err = _refused(_register, client, how, name, tiny_adapters["attn4"])
    assert err.code == "INVALID_ARGUMENT"
    assert f"invalid adapter name {name!r}" in err.message, err.message
    store = server[0].store
    assert not (store.parent / "evil").exists() and not (store / "evil").exists()


def test_uploaded_file_name_with_dot_dot_is_refused(server, tiny_adapters):
    """The client only sends base names, so speak the protocol directly."""
    data = (tiny_adapters["attn4"] / "adapter_config.json").read_bytes()
    messages = [admin_pb2.UploadAdapterRequest(name="sneaky"),
                admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(path="../adapter_config.json", data=data))]
    with grpc.insecure_channel(server[0].target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            admin_pb2_grpc.AdminStub(channel).UploadAdapter(iter(messages), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid file name '../adapter_config.json'" in info.value.details(), info.value.details()
    assert not (server[0].store / "adapter_config.json").exists()


@pytest.mark.parametrize("how", ["upload", "path"])
@pytest.mark.parametrize("case, fragment", [
    ("wrongshape", "lora_A has shape [4, 32] but the base layer needs [4, 64]"),
    ("rank16", f"rank 16 exceeds the server's --max-lora-rank {MAX_RANK}"),
    ("truncated", "truncated"),
])
def test_unservable_adapter_is_refused(client, bad_adapters, how, case, fragment):
    err = _refused(_register, client, how, f"{case}-{how}", bad_adapters[case])
    assert err.code == "INVALID_ARGUMENT"
    assert fragment in err.message, err.message
    assert "adapter_model.safetensors" in err.message or case != "truncated", err.message


@pytest.mark.parametrize("how", ["upload", "path"])
def test_refusal_names_the_adapter_not_a_staging_directory(client, bad_adapters, how):
    """The engine's checks run on the store's staging copy; the message must still name what the
    operator sent (a regression test: it once named <store>/staging/stage-XXXX)."""
    name = f"wrongshape-named-{how}"
    err = _refused(_register, client, how, name, bad_adapters["wrongshape"])
    assert err.code == "INVALID_ARGUMENT"
    assert "/staging/" not in err.message, err.message
    assert repr(name) in err.message or str(bad_adapters["wrongshape"]) in err.message, err.message


def _upload_raw(target: str, messages: list):
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            admin_pb2_grpc.AdminStub(channel).UploadAdapter(iter(messages), timeout=60)
    return info.value.code(), info.value.details()


def _chunk(path: str, data: bytes = b"{}"):
    return admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(path=path, data=data))


@pytest.mark.parametrize("case, messages, fragment", [
    ("nothing", [], "the first upload message must carry the name"),
    ("chunk first", [_chunk("adapter_config.json")], "the first upload message must carry the name"),
    ("name only", [admin_pb2.UploadAdapterRequest(name="empty")], "the directory is empty"),
    ("name twice", [admin_pb2.UploadAdapterRequest(name="a"), admin_pb2.UploadAdapterRequest(name="b")],
     "only file chunks may follow the name"),
    ("too many files", [admin_pb2.UploadAdapterRequest(name="many")] + [_chunk(f"f{i}") for i in range(17)],
     "more than 16 files"),
    ("hidden file", [admin_pb2.UploadAdapterRequest(name="hidden"), _chunk(".env")], "invalid file name '.env'"),
])
def test_malformed_upload_is_refused(server, case, messages, fragment):
    code, details = _upload_raw(server[0].target, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, code, details)
    assert fragment in details, (case, details)


def test_register_needs_an_adapter_directory(client, tiny_model, tmp_path):
    err = _refused(client.register_adapter, "nodir", str(tmp_path / "absent"))
    assert err.code == "INVALID_ARGUMENT" and "no directory" in err.message, err
    err = _refused(client.register_adapter, "model", str(tiny_model))  # a model, not an adapter
    assert err.code == "INVALID_ARGUMENT" and "adapter_config.json is missing" in err.message, err


# ----------------------------------------------------------------------------- requests


REQUESTS = {  # case -> (generate kwargs, status, message fragment)
    "empty prompt": (dict(prompt=""), "INVALID_ARGUMENT", "the prompt is empty"),
    "empty chat": (dict(messages=[]), "INVALID_ARGUMENT", "the chat has no messages"),
    "max_new_tokens 0": (dict(prompt="hi", max_new_tokens=0), "INVALID_ARGUMENT",
                         "max_new_tokens must be at least 1, got 0"),
    "max_new_tokens negative": (dict(prompt="hi", max_new_tokens=-5), "INVALID_ARGUMENT",
                                "max_new_tokens must be at least 1, got -5"),
    "max_new_tokens over the limit": (dict(prompt="hi", max_new_tokens=MAX_NEW + 1), "INVALID_ARGUMENT",
                                      f"max_new_tokens {MAX_NEW + 1} is over the limit of {MAX_NEW}"),
    "unknown endpoint": (dict(prompt="hi", endpoint="nope"), "NOT_FOUND", "endpoint 'nope' not found"),
    "unknown adapter": (dict(prompt="hi", adapter="nope"), "NOT_FOUND", "adapter 'nope' not found"),
    "unknown version": (dict(prompt="hi", adapter="good@7"), "NOT_FOUND", "adapter 'good@7' not found"),
    "bad version": (dict(prompt="hi", adapter="good@01"), "INVALID_ARGUMENT", "must be a positive integer"),
    "soft prompt as adapter": (dict(prompt="hi", adapter="persona"), "INVALID_ARGUMENT",
                               "persona@1 is a soft prompt; pass it as soft_prompt"),
    "endpoint and adapter": (dict(prompt="hi", endpoint="task", adapter="good"), "INVALID_ARGUMENT",
                             "give an endpoint or an adapter/soft_prompt, not both"),
    "negative temperature": (dict(prompt="hi", temperature=-1.0, max_new_tokens=4), "INVALID_ARGUMENT",
                             "temperature must be >= 0"),
    "oversized message": (dict(prompt="x" * (2 * MAX_MESSAGE)), "RESOURCE_EXHAUSTED", "larger than max"),
    "prompt beyond the context": (dict(prompt="the quick brown fox " * 80, max_new_tokens=4), "INVALID_ARGUMENT",
                                  "beyond the model's context of 256"),
    "chat turn without a role": (dict(messages=[{"role": "", "content": "hi"}], max_new_tokens=4),
                                 "INVALID_ARGUMENT", "chat message 0 has no role"),
    "too many stop strings": (dict(prompt="hi", stop=["a"] * 17, max_new_tokens=4), "INVALID_ARGUMENT",
                              "at most 16 stop strings"),
}


@pytest.mark.parametrize("rpc", ["generate", "stream"])
@pytest.mark.parametrize("case", list(REQUESTS))
def test_bad_request_gets_its_status_and_message(client, case, rpc):
    kwargs, code, fragment = REQUESTS[case]
    if rpc == "generate":
        err = _refused(client.generate, **kwargs)
    else:
        err = _refused(lambda: list(client.stream(**kwargs)))
    assert err.code == code, (case, err)
    assert fragment in err.message, (case, err.message)


def test_duplicate_request_id_in_flight_is_refused_and_leaves_the_first_alone(client, server):
    first = client.stream("hello world", max_new_tokens=MAX_NEW, ignore_eos=True, request_id="dup")
    head = next(first)  # the first request is in the engine now
    err = _refused(client.generate, "hello", request_id="dup", max_new_tokens=2)
    assert err.code == "INVALID_ARGUMENT" and "'dup' is already in flight" in err.message, err
    rest = list(first)
    assert rest[-1].finish_reason == "length"
    assert len(head.token_ids) + sum(len(e.token_ids) for e in rest) == MAX_NEW
    assert {e.request_id for e in rest} == {"dup"}


def test_request_without_max_new_tokens_fits_the_limit(client):
    """The server default (256) is capped by --max-new-tokens-limit (64) rather than refused for
    exceeding it (a regression test: it was refused, blaming a value the client never sent)."""
    got = client.generate("hello world", ignore_eos=True)
    assert got.completion_tokens == MAX_NEW


# ----------------------------------------------------------------------------- afterwards


def test_nothing_bad_was_stored(client, server):
    names = sorted((a["name"], a["version"]) for a in client.list_adapters())
    assert names == [("good", 1), ("persona", 1)]
    store = server[0].store
    assert len([p for p in (store / "blobs").iterdir()]) == 2
    staging = store / "staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())


def test_server_still_healthy_and_generating_the_same(client, server, api):
    srv, before = server
    assert api.health(srv.target) == "SERVING"
    assert api.health(srv.target, "loraplex.v1.Inference") == "SERVING"
    assert srv.proc.poll() is None
    after = [client.generate(max_new_tokens=12, ignore_eos=True, **p) for p in PROBES]
    for b, a in zip(before, after):
        assert (a.token_ids, a.text, a.adapter) == (b.token_ids, b.text, b.adapter)
    assert before[0].token_ids != before[1].token_ids  # the adapter matters
    assert "Traceback" not in srv.output(), srv.output()
