"""The Admin API of a real server: endpoints and their updates, canary splits, deleting what an
endpoint uses, pinning, server info, reflection, and token checks."""
from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from loraplex.clients.aio import AsyncClient
from loraplex.clients.client import Client, LoraplexError

LONG = 200  # tokens
MAX_LORAS = 3
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def server(module_server_factory, tiny_adapters):
    srv = module_server_factory("--max-loras", str(MAX_LORAS), name="admin")
    with Client(srv.target, timeout=60) as client:
        client.upload_adapter("sum", tiny_adapters["attn4"])
        client.register_adapter("sum", str(tiny_adapters["mlp8"]))
        for name, fixture in (("p-attn", "attn4"), ("p-mlp", "mlp8"), ("p-rs", "rs2"), ("p-all", "all16")):
            client.register_adapter(name, str(tiny_adapters[fixture]))
        client.upload_adapter("persona", tiny_adapters["soft"])
    return srv


@pytest.fixture
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def _refused(fn, *args, **kwargs) -> LoraplexError:
    with pytest.raises(LoraplexError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.fixture(scope="module")
def references(server):
    """Each version of "sum" on PROMPT, run alone (so in the same batch shape as the tests' runs)."""
    with Client(server.target, timeout=60) as client:
        return {v: client.generate(PROMPT, adapter=v, max_new_tokens=LONG, ignore_eos=True).token_ids
                for v in ("sum@1", "sum@2")}


# ----------------------------------------------------------------------------- endpoints


def test_endpoint_crud_and_validation(client):
    created = client.create_endpoint("crud", adapter="sum", soft_prompt="persona", template="Q: {input}",
                                     system_message="Be brief.", defaults={"max_new_tokens": 5, "temperature": 0.5},
                                     max_new_tokens_cap=20)
    assert created["adapter"] == "sum@2" and created["soft_prompt"] == "persona@1"  # latest, frozen at save
    got = client.get_endpoint("crud")
    assert got == created
    assert (got["defaults"]["max_new_tokens"], got["defaults"]["temperature"]) == (5, 0.5)
    assert "top_p" not in got["defaults"]  # unset stays unset
    assert got["max_new_tokens_cap"] == 20 and got["system_message"] == "Be brief."
    assert "crud" in [e["name"] for e in client.list_endpoints()]
    cases = [
        (dict(name="crud", adapter="sum"), "ALREADY_EXISTS", "already exists"),
        (dict(name="bad-template", adapter="sum", template="{input} and {other}"), "INVALID_ARGUMENT", "{other}"),
        (dict(name="no-slot", adapter="sum", template="no slot"), "INVALID_ARGUMENT", "exactly one {input}"),
        (dict(name="missing", adapter="ghost"), "NOT_FOUND", "ghost"),
        (dict(name="missing-version", adapter="sum@9"), "NOT_FOUND", "sum@9"),
        (dict(name="wrong-kind", adapter="persona"), "INVALID_ARGUMENT", "this field takes a lora"),
        (dict(name="../up", adapter="sum"), "INVALID_ARGUMENT", "invalid endpoint name"),
        (dict(name="same-canary", adapter="sum@1", canary=("sum@1", 0.5)), "INVALID_ARGUMENT", "different version"),
        (dict(name="canary-weight", adapter="sum@1", canary=("sum@2", 1.5)), "INVALID_ARGUMENT", "strictly between"),
    ]
    for kwargs, code, fragment in cases:
        err = _refused(lambda: client.create_endpoint(**kwargs))
        assert err.code == code and fragment in err.message, (kwargs, err)
    assert _refused(client.update_endpoint, "nowhere", adapter="sum").code == "NOT_FOUND"
    client.delete_endpoint("crud")
    assert _refused(client.get_endpoint, "crud").code == "NOT_FOUND"
    assert _refused(client.generate, "hi", endpoint="crud").code == "NOT_FOUND"


def test_deleting_an_adapter_an_endpoint_uses_fails_precondition(client, tiny_adapters):
    client.upload_adapter("doomed", tiny_adapters["rs2"])
    client.upload_adapter("doomed", tiny_adapters["attn4"])
    client.create_endpoint("uses-doomed", adapter="doomed@1", soft_prompt="persona")
    for ref in ("doomed", "doomed@1", "persona"):
        err = _refused(client.delete_adapter, ref)
        assert err.code == "FAILED_PRECONDITION", err
        assert "uses-doomed" in err.message, err.message
    # nothing was deleted: the endpoint still serves
    assert client.generate("hi", endpoint="uses-doomed", max_new_tokens=2).adapter == "doomed@1"
    # a version no endpoint uses can go
    assert [d["version"] for d in client.delete_adapter("doomed@2")] == [2]
    client.delete_endpoint("uses-doomed")
    deleted = client.delete_adapter("doomed")
    assert [(d["name"], d["version"]) for d in deleted] == [("doomed", 1)]
    assert _refused(client.get_adapter, "doomed").code == "NOT_FOUND"
    err = _refused(client.generate, "hi", adapter="doomed@1", max_new_tokens=2)
    assert err.code == "NOT_FOUND", err
    assert "doomed" not in [a["name"] for a in client.list_adapters()]


def test_update_takes_effect_for_new_requests_while_in_flight_finishes_on_old(server, client, references):
    client.create_endpoint("summary", adapter="sum@1")

    async def scenario():
        async with AsyncClient(server.target, timeout=120) as aclient:
            first = asyncio.Event()
            events = []

            async def stream():
                async for e in aclient.stream(PROMPT, endpoint="summary", max_new_tokens=LONG, ignore_eos=True):
                    events.append(e)
                    first.set()

            task = asyncio.create_task(stream())
            await first.wait()
            updated = await aclient.update_endpoint("summary", adapter="sum@2")
            in_flight = not events[-1].is_final
            await task
            return updated, in_flight, events

    updated, in_flight, events = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert updated["adapter"] == "sum@2"
    assert in_flight, "the stream ended before the update: nothing was tested"
    assert {(e.served_by.endpoint, e.served_by.adapter) for e in events} == {("summary", "sum@1")}
    assert [i for e in events for i in e.token_ids] == references["sum@1"]
    after = client.generate(PROMPT, endpoint="summary", max_new_tokens=LONG, ignore_eos=True)
    assert (after.endpoint, after.adapter) == ("summary", "sum@2")
    assert after.token_ids == references["sum@2"] != references["sum@1"]
    got = client.get_endpoint("summary")
    assert got["adapter"] == "sum@2" and got["updated_at"] > got["created_at"]


def test_canary_split_serves_both_versions_and_says_which(client, references):
    client.create_endpoint("split", adapter="sum@1", canary=("sum@2", 0.5))
    assert client.get_endpoint("split")["canary"] == {"adapter": "sum@2", "weight": 0.5}
    served = Counter()
    for _ in range(40):
        c = client.generate(PROMPT, endpoint="split", max_new_tokens=6, ignore_eos=True)
        assert c.endpoint == "split"
        served[c.adapter] += 1
        assert c.token_ids == references[c.adapter][:6], c.adapter  # served_by names what really ran
    assert set(served) == {"sum@1", "sum@2"}, served
    assert min(served.values()) >= 5, served  # 0.5 of 40: fewer than 5 has odds below 1e-7


# ----------------------------------------------------------------------------- pinning


def _resident(client: Client, ref: str) -> tuple[bool, bool, bool]:
    info = client.get_adapter(ref)
    return info["resident"], info["pinned"], ref in client.server_info().get("resident_adapters", [])


def test_pin_keeps_an_adapter_resident_until_unpinned(client):
    pinned = client.pin("p-all")
    assert (pinned["name"], pinned["version"], pinned["pinned"], pinned["resident"]) == ("p-all", 1, True, True)
    assert _resident(client, "p-all@1") == (True, True, True)
    others = ["p-attn", "p-mlp", "p-rs", "sum@1", "sum@2"]
    for ref in others * 2:  # more distinct adapters than the free slots
        client.generate("hi", adapter=ref, max_new_tokens=1)
    assert _resident(client, "p-all@1") == (True, True, True)
    assert len(client.server_info()["resident_adapters"]) == MAX_LORAS

    unpinned = client.unpin("p-all@1")
    assert (unpinned["pinned"], unpinned["resident"]) == (False, True)
    for _ in range(MAX_LORAS):  # each load of a non-resident adapter evicts the least recently used
        resident = set(client.server_info()["resident_adapters"])
        ref = next(r for r in ["p-attn@1", "p-mlp@1", "p-rs@1", "sum@1", "sum@2"] if r not in resident)
        client.generate("hi", adapter=ref, max_new_tokens=1)
    assert _resident(client, "p-all@1") == (False, False, False)


def test_pin_refusals(client):
    err = _refused(client.pin, "persona")
    assert err.code == "INVALID_ARGUMENT" and "soft prompt" in err.message, err
    assert _refused(client.pin, "ghost").code == "NOT_FOUND"
    assert _refused(client.unpin, "ghost@3").code == "NOT_FOUND"


class _AllPinned:
    """Every slot pinned (p-attn, p-mlp, p-rs), unpinned again on exit."""

    REFS = ("p-attn", "p-mlp", "p-rs")

    def __init__(self, client: Client) -> None:
        self.client = client

    def __enter__(self):
        for ref in self.REFS:
            assert self.client.pin(ref)["pinned"]
        return self

    def __exit__(self, *exc) -> None:
        for ref in self.REFS:
            self.client.unpin(ref)


def test_every_slot_pinned(client):
    with _AllPinned(client):
        err = _refused(client.pin, "p-all")
        assert err.code == "RESOURCE_EXHAUSTED" and "pinned" in err.message, err
        assert sorted(client.server_info()["resident_adapters"]) == ["p-attn@1", "p-mlp@1", "p-rs@1"]
        assert client.generate("hi", adapter="p-mlp", max_new_tokens=2).completion_tokens == 2  # pinned ones serve
        assert client.generate("hi", max_new_tokens=2).completion_tokens == 2  # so does the base model
    assert client.generate("hi", adapter="p-all", max_new_tokens=2).completion_tokens == 2  # a slot is free again


def test_request_for_an_adapter_with_every_slot_pinned_is_resource_exhausted(client):
    """As PinAdapter says for the same condition (a regression test: it was INTERNAL)."""
    with _AllPinned(client):
        err = _refused(client.generate, "hi", adapter="sum@1", max_new_tokens=2)
    assert err.code == "RESOURCE_EXHAUSTED", err
    assert "all 3 adapter slots are pinned" in err.message, err.message
    assert client.generate("hi", adapter="sum@1", max_new_tokens=2).completion_tokens == 2  # once unpinned


def test_deleting_an_adapter_mid_stream_lets_the_stream_finish(client, tiny_adapters):
    client.upload_adapter("short-lived", tiny_adapters["mlp8"])
    stream = client.stream(PROMPT, adapter="short-lived", max_new_tokens=LONG, ignore_eos=True)
    head = next(stream)
    assert [d["name"] for d in client.delete_adapter("short-lived")] == ["short-lived"]
    rest = list(stream)
    assert rest and rest[-1].finish_reason == "length"
    assert len(head.token_ids) + sum(len(e.token_ids) for e in rest) == LONG
    assert {e.served_by.adapter for e in rest} == {"short-lived@1"}
    assert _refused(client.generate, "hi", adapter="short-lived", max_new_tokens=1).code == "NOT_FOUND"
    assert "short-lived@1" not in client.server_info().get("resident_adapters", [])


# ----------------------------------------------------------------------------- info, reflection


def test_server_info(client, tiny_model):
    info = client.server_info()
    assert info["max_loras"] == MAX_LORAS and info["max_lora_rank"] == 64
    assert info["max_queue"] == 256 and info["max_new_tokens"] == 4096 and info["max_running"] == 64
    assert info["dtype"] == "float32" and info["quantize"] == "none"
    assert info["max_model_len"] == 256 and info["version"]
    assert info["model"] == str(tiny_model)  # as given to --model


def test_reflection_lists_the_services(server):
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="loraplex.v1.Inference")]
        listed, found = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert names >= {"loraplex.v1.Inference", "loraplex.v1.Admin", "grpc.health.v1.Health",
                     "grpc.reflection.v1alpha.ServerReflection"}, names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in found.file_descriptor_response.file_descriptor_proto]
    services = {s.name: [m.name for m in s.method] for f in files for s in f.service}
    assert services["Inference"] == ["Generate", "GenerateStream", "Score"]


def test_endpoint_cap_applies_to_requests_that_leave_the_length_unset(client):
    """The server default (256) is capped by the endpoint's max_new_tokens_cap (a regression test:
    such requests were refused with 'max_new_tokens 256 is over the limit of 5')."""
    client.create_endpoint("capped", adapter="sum@1", max_new_tokens_cap=5, defaults={"ignore_eos": True})
    got = client.generate("hello", endpoint="capped")
    assert got.completion_tokens == 5
    err = _refused(client.generate, "hello", endpoint="capped", max_new_tokens=6)  # asking for more is refused
    assert err.code == "INVALID_ARGUMENT" and "over the limit of 5" in err.message, err


# ----------------------------------------------------------------------------- tokens


ADMIN_TOKEN = "admin-secret-1"
API_KEY = "api-key-2"


@pytest.fixture(scope="module")
def auth_server(module_server_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    (root / "admin").write_text(ADMIN_TOKEN + "\n")
    (root / "key").write_text(API_KEY + "\n")
    return module_server_factory("--admin-token-file", str(root / "admin"), "--api-key-file", str(root / "key"),
                                 name="auth")


ADMIN_CALLS = {
    "GetServerInfo": lambda c, d: c.server_info(),
    "ListAdapters": lambda c, d: c.list_adapters(),
    "UploadAdapter": lambda c, d: c.upload_adapter("up", d),
    "RegisterAdapter": lambda c, d: c.register_adapter("reg", str(d)),
    "CreateEndpoint": lambda c, d: c.create_endpoint("ep"),
    "DeleteAdapter": lambda c, d: c.delete_adapter("up"),
}


@pytest.mark.parametrize("token", [None, "wrong", API_KEY])
def test_admin_calls_need_the_admin_token(auth_server, tiny_adapters, token):
    with Client(auth_server.target, admin_token=token, api_key=API_KEY, timeout=60) as client:
        for rpc, call in ADMIN_CALLS.items():
            err = _refused(call, client, tiny_adapters["attn4"])
            assert err.code == "UNAUTHENTICATED", (rpc, err)
            assert f"/loraplex.v1.Admin/{rpc} needs the admin token" in err.message, err.message
        assert client.generate("hi", max_new_tokens=1).completion_tokens == 1  # inference is unaffected


def test_admin_calls_with_the_token_succeed(auth_server, tiny_adapters):
    with Client(auth_server.target, admin_token=ADMIN_TOKEN, timeout=60) as client:  # sends x-admin-token
        assert client.upload_adapter("up", tiny_adapters["attn4"])["version"] == 1
        assert client.server_info()["max_loras"] == 32
    # the Authorization: Bearer form works as well
    from loraplex.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(auth_server.target) as channel:
        info = admin_pb2_grpc.AdminStub(channel).GetAdapter(
            admin_pb2.AdapterRef(name="up"), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=30)
    assert info.name == "up" and info.version == 1


@pytest.mark.parametrize("key", [None, "wrong", ADMIN_TOKEN])
def test_inference_needs_the_api_key(auth_server, key):
    with Client(auth_server.target, api_key=key, admin_token=ADMIN_TOKEN, timeout=60) as client:
        for call in (lambda: client.generate("hi", max_new_tokens=1),
                     lambda: list(client.stream("hi", max_new_tokens=1))):
            err = _refused(call)
            assert err.code == "UNAUTHENTICATED", err
            assert "needs an API key" in err.message, err.message
        assert client.list_endpoints() == []  # admin is unaffected


def test_inference_with_the_api_key_succeeds(auth_server):
    with Client(auth_server.target, api_key=API_KEY, timeout=60) as client:
        assert client.generate("hi", max_new_tokens=2, ignore_eos=True).completion_tokens == 2
        events = list(client.stream("hi", max_new_tokens=2, ignore_eos=True))
        assert events[-1].completion_tokens == 2
    from loraplex.v1 import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(auth_server.target) as channel:  # the x-api-key form
        reply = inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(prompt="hi", sampling=inference_pb2.SamplingParameters(max_new_tokens=1)),
            metadata=(("x-api-key", API_KEY),), timeout=30)
    assert len(reply.token_ids) == 1


def test_health_and_reflection_stay_open(auth_server, api):
    assert api.health(auth_server.target) == "SERVING"
    assert api.health(auth_server.target, "loraplex.v1.Admin") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(auth_server.target) as channel:
        [reply] = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
    assert "loraplex.v1.Admin" in {s.name for s in reply.list_services_response.service}
