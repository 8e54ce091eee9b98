"""The KServe / Open Inference Protocol v2 front of a real server, driven by the real
`tritonclient.grpc` client: health, metadata, text generation on adapters, endpoints, soft
prompts and the base model (compared with loraplex.v1 Generate for the same greedy request),
streaming, malformed tensors, the model-repository extension and token checks.

This process imports tritonclient's own `inference` stubs, never loraplex.v1.kserve_v2_pb2
(both define the same protobuf symbols).
"""
from __future__ import annotations

import queue
import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from loraplex.clients.client import Client

PROMPT = "the quick brown fox"
TOKENS = 12
MAX_LORAS = 2


@pytest.fixture(scope="module")
def server(module_server_factory, tiny_adapters):
    srv = module_server_factory("--max-loras", str(MAX_LORAS), name="kserve")
    with Client(srv.target, timeout=60) as client:
        client.register_adapter("sum", str(tiny_adapters["attn4"]))
        client.register_adapter("sum", str(tiny_adapters["mlp8"]))  # sum@2
        client.register_adapter("style", str(tiny_adapters["all16"]))
        client.register_adapter("extra", str(tiny_adapters["rs2"]))
        client.register_adapter("persona", str(tiny_adapters["soft"]))
        client.create_endpoint("summary", adapter="sum@1", template="Summarize: {input}")
    return srv


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def loraplex(server):
    with Client(server.target, timeout=60) as client:
        yield client


def text_inputs(prompt: str, **scalars) -> list[triton.InferInput]:
    """text_input plus scalar inputs, the way Triton's LLM backends take them."""
    dtypes = {bool: ("BOOL", np.bool_), int: ("INT32", np.int32), float: ("FP32", np.float32)}
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs = [text]
    for name, value in scalars.items():
        datatype, np_type = dtypes[type(value)]
        tensor = triton.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=np_type))
        inputs.append(tensor)
    return inputs


def text_output(result) -> str:
    values = result.as_numpy("text_output")
    assert values.shape == (1,)
    return values[0].decode()


def refused(fn, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    return info.value


GREEDY = dict(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)


# ----------------------------------------------------------------------------- health, metadata


def test_live_ready_and_server_metadata(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    meta = triton_client.get_server_metadata()
    assert meta.name == "loraplex" and meta.version
    assert "model_repository" in meta.extensions


def test_model_ready_and_metadata(triton_client, tiny_model):
    for name, version in (("sum", ""), ("sum", "1"), ("sum@2", ""), ("summary", ""), ("persona", ""),
                          (str(tiny_model), "")):
        assert triton_client.is_model_ready(name, version), (name, version)
    for name, version in (("ghost", ""), ("sum", "9"), ("summary", "1"), ("sum@1", "2")):
        assert not triton_client.is_model_ready(name, version), (name, version)

    meta = triton_client.get_model_metadata("sum")
    assert meta.name == "sum" and list(meta.versions) == ["1", "2"] and meta.platform == "loraplex"
    inputs = {t.name: t.datatype for t in meta.inputs}
    assert inputs["text_input"] == "BYTES" and inputs["max_tokens"] == "INT32" and inputs["stream"] == "BOOL"
    assert [(t.name, t.datatype) for t in meta.outputs] == [("text_output", "BYTES")]
    assert list(triton_client.get_model_metadata("summary").versions) == []

    err = refused(triton_client.get_model_metadata, "ghost")
    assert err.status() == "StatusCode.NOT_FOUND" and "'ghost'" in err.message()
    err = refused(triton_client.get_model_metadata, "sum", "9")
    assert err.status() == "StatusCode.NOT_FOUND" and "sum" in err.message() and "9" in err.message()
    err = refused(triton_client.get_model_metadata, "summary", "1")
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "no versions" in err.message()


def test_reflection_lists_the_kserve_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (listed,) = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "loraplex.v1.Inference"} <= names


def test_unimplemented_rpcs_answer_unimplemented(triton_client):
    err = refused(triton_client.get_model_config, "sum")
    assert err.status() == "StatusCode.UNIMPLEMENTED"


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("model, version, generate_kwargs, served_version", [
    ("sum", "1", dict(adapter="sum@1"), "1"),
    ("sum", "", dict(adapter="sum@2"), "2"),  # no version: the latest
    ("sum@1", "", dict(adapter="sum@1"), "1"),
    ("summary", "", dict(endpoint="summary"), ""),
    ("persona", "", dict(soft_prompt="persona"), "1"),
    ("BASE", "", dict(), ""),
])
def test_greedy_infer_matches_loraplex_v1(triton_client, loraplex, tiny_model, model, version, generate_kwargs,
                                          served_version):
    model = str(tiny_model) if model == "BASE" else model
    expected = loraplex.generate(PROMPT, max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True, **generate_kwargs)
    result = triton_client.infer(model, text_inputs(PROMPT, exclude_input_in_output=True, **GREEDY),
                                 model_version=version, request_id="req-7")
    assert text_output(result) == expected.text
    response = result.get_response()
    assert response.model_name == model and response.id == "req-7"
    assert response.model_version == served_version
    params = response.parameters
    assert params["finish_reason"].string_param == "length"
    assert params["completion_tokens"].int64_param == TOKENS == expected.completion_tokens
    assert params["prompt_tokens"].int64_param == expected.prompt_tokens


def test_adapters_change_the_output_and_the_prompt_leads_by_default(triton_client, tiny_model):
    outputs = {m: text_output(triton_client.infer(m, text_inputs(PROMPT, exclude_input_in_output=True, **GREEDY)))
               for m in ("sum@1", "sum@2", str(tiny_model))}
    assert len(set(outputs.values())) == 3, outputs  # each adapter really applies
    full = text_output(triton_client.infer("sum@1", text_inputs(PROMPT, **GREEDY)))
    assert full == PROMPT + outputs["sum@1"]  # Triton's LLM backends prepend the prompt unless excluded


def test_typed_contents_and_request_parameters(server, triton_client):
    """Inputs as typed `contents` (not raw), settings as request parameters, a [1, 1] prompt."""
    expected = text_output(triton_client.infer("sum", text_inputs(PROMPT, exclude_input_in_output=True, **GREEDY)))
    request = service_pb2.ModelInferRequest(model_name="sum")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    text.contents.bytes_contents.append(PROMPT.encode())
    tokens = request.inputs.add(name="max_tokens", datatype="INT64", shape=[1])
    tokens.contents.int64_contents.append(TOKENS)
    request.parameters["temperature"].double_param = 0.0
    request.parameters["ignore_eos"].bool_param = True
    request.parameters["exclude_input_in_output"].bool_param = True
    with grpc.insecure_channel(server.target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    (out,) = response.outputs
    assert out.name == "text_output" and out.datatype == "BYTES" and list(out.shape) == [1, 1]
    (raw,) = response.raw_output_contents
    (length,) = struct.unpack_from("<I", raw)
    assert raw[4:].decode() == expected and length == len(raw) - 4


def test_greedy_infer_counts_in_the_shared_metrics(server, triton_client, api):
    before = api.metric(api.scrape(server), "loraplex_requests_total", endpoint="summary", status="ok")
    triton_client.infer("summary", text_inputs(PROMPT, max_tokens=2))
    after = api.metric(api.scrape(server), "loraplex_requests_total", endpoint="summary", status="ok")
    assert after == before + 1


# ----------------------------------------------------------------------------- streaming


class Stream:
    """tritonclient's callback stream, collected per request id."""

    def __init__(self, client: triton.InferenceServerClient) -> None:
        self.client = client
        self.events: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def until_final(self, count: int) -> dict[str, list]:
        """Responses by request id until `count` requests ended (a final response or an error)."""
        got: dict[str, list] = {}
        finished = 0
        while finished < count:
            result, error = self.events.get(timeout=60)
            if error is not None:
                got.setdefault("errors", []).append(error)
                finished += 1
                continue
            response = result.get_response()
            got.setdefault(response.id, []).append(result)
            if response.parameters["triton_final_response"].bool_param:
                finished += 1
        return got


@pytest.fixture
def stream(triton_client):
    s = Stream(triton_client)
    yield s
    triton_client.stop_stream()


def test_streamed_deltas_join_to_the_loraplex_v1_text(stream, loraplex):
    expected = loraplex.generate(PROMPT, adapter="sum@1", max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    stream.client.async_stream_infer("sum", text_inputs(PROMPT, stream=True, **GREEDY), model_version="1",
                                     request_id="s1")
    stream.client.async_stream_infer("sum@1", text_inputs(PROMPT, **GREEDY), request_id="whole")
    got = stream.until_final(2)
    deltas = [r.as_numpy("text_output")[0].decode() for r in got["s1"]]
    assert len(deltas) > 2 and "".join(deltas) == expected.text  # streamed: new text only
    final = got["s1"][-1].get_response().parameters
    assert final["finish_reason"].string_param == "length" and final["completion_tokens"].int64_param == TOKENS
    assert all(not r.get_response().parameters["triton_final_response"].bool_param for r in got["s1"][:-1])
    (whole,) = got["whole"]  # not streamed: one response, the prompt in front
    assert whole.as_numpy("text_output")[0].decode() == PROMPT + expected.text


def test_stream_empty_final_response_and_errors_keep_the_stream_open(stream):
    stream.client.async_stream_infer("ghost", text_inputs(PROMPT, stream=True), request_id="bad")
    stream.client.async_stream_infer("sum", text_inputs(PROMPT, stream=True, max_tokens=3), request_id="ok",
                                     enable_empty_final_response=True)
    got = stream.until_final(2)
    (error,) = got["errors"]
    assert "no endpoint, adapter or base model named 'ghost'" in str(error)
    *deltas, final = got["ok"]
    assert final.get_response().outputs == [] and final.as_numpy("text_output") is None  # empty final response
    assert final.get_response().parameters["completion_tokens"].int64_param == 3
    assert deltas and all(d.as_numpy("text_output") is not None for d in deltas)


def test_stream_flag_on_unary_infer_is_refused(triton_client):
    err = refused(triton_client.infer, "sum", text_inputs(PROMPT, stream=True))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "ModelStreamInfer" in err.message()


# ----------------------------------------------------------------------------- bad input


def _tensor(name: str, datatype: str, shape: list[int], array) -> triton.InferInput:
    t = triton.InferInput(name, shape, datatype)
    t.set_data_from_numpy(array)
    return t


def _text(prompt: bytes = PROMPT.encode(), shape=(1,)) -> triton.InferInput:
    return _tensor("text_input", "BYTES", list(shape), np.array([prompt] * int(np.prod(shape)),
                                                                 dtype=np.object_).reshape(shape))


BAD_INPUTS = [
    ([_tensor("max_tokens", "INT32", [1], np.array([3], dtype=np.int32))], "no text_input input"),
    ([_tensor("text_input", "INT32", [1], np.array([3], dtype=np.int32))], "text_input must be BYTES"),
    ([_text(shape=(2,))], "must hold one prompt"),
    ([_text(b"\xff\xfe")], "not valid UTF-8"),
    ([_text(), _tensor("prompt", "BYTES", [1], np.array([b"x"], dtype=np.object_))], "unknown input 'prompt'"),
    ([_text(), _tensor("max_tokens", "FP32", [1], np.array([3.0], dtype=np.float32))],
     "'max_tokens' must be one of INT8"),
    ([_text(), _tensor("max_tokens", "INT32", [2], np.array([3, 4], dtype=np.int32))], "must hold one value"),
    ([_text(), _tensor("max_tokens", "INT32", [1], np.array([0], dtype=np.int32))],
     "max_new_tokens must be at least 1"),  # the shared validation path speaks
    ([_text(), _tensor("temperature", "FP32", [1], np.array([-1.0], dtype=np.float32))], "temperature"),
    ([_text(), _tensor("max_tokens", "FP16", [1], np.array([3], dtype=np.float16))], "datatype 'FP16'"),
    ([_text(), _tensor("seed", "INT64", [1], np.array([-5], dtype=np.int64))], "seed must be in [0, 2**63)"),
]


@pytest.mark.parametrize("inputs, fragment", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_malformed_inputs_are_invalid_argument(triton_client, inputs, fragment):
    err = refused(triton_client.infer, "sum", inputs)
    assert err.status() == "StatusCode.INVALID_ARGUMENT", err
    assert fragment in err.message(), err.message()


def test_malformed_raw_contents_and_outputs(server, triton_client):
    def call(request):
        with grpc.insecure_channel(server.target) as channel:
            return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)

    def base():
        request = service_pb2.ModelInferRequest(model_name="sum")
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        return request

    cases = []
    truncated = base()
    truncated.raw_input_contents.append(struct.pack("<I", 100) + b"short")
    cases.append((truncated, "claims 100 bytes but only 5 remain"))
    too_many = base()
    too_many.raw_input_contents.extend([struct.pack("<I", 1) + b"x", b""])
    cases.append((too_many, "1 inputs but 2 raw_input_contents"))
    wrong_output = base()
    wrong_output.raw_input_contents.append(struct.pack("<I", 1) + b"x")
    wrong_output.outputs.add(name="logits")
    cases.append((wrong_output, "unknown output 'logits'"))
    bad_param = base()
    bad_param.raw_input_contents.append(struct.pack("<I", 1) + b"x")
    bad_param.parameters["max_tokens"].string_param = "ten"
    cases.append((bad_param, "'max_tokens' must be a int"))
    for request, fragment in cases:
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert fragment in info.value.details(), info.value.details()
    # the server keeps serving
    assert text_output(triton_client.infer("sum", text_inputs(PROMPT, max_tokens=2))).startswith(PROMPT)


def test_unknown_model_is_not_found(triton_client):
    err = refused(triton_client.infer, "ghost", text_inputs(PROMPT))
    assert err.status() == "StatusCode.NOT_FOUND" and "'ghost'" in err.message()
    err = refused(triton_client.infer, "sum", text_inputs(PROMPT), model_version="7")
    assert err.status() == "StatusCode.NOT_FOUND" and "7" in err.message()


# ----------------------------------------------------------------------------- the repository extension


def _index(triton_client) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in triton_client.get_model_repository_index().models}


def test_repository_load_pins_and_unload_unpins_without_deleting(triton_client, loraplex):
    index = _index(triton_client)
    assert set(index) == {("sum", "1"), ("sum", "2"), ("style", "1"), ("extra", "1"), ("persona", "1")}
    assert all(state == "READY" for state, _ in index.values())
    assert index[("persona", "1")][1] == "resident"  # a soft prompt stays on the device
    assert index[("style", "1")][1] in ("registered", "resident")

    triton_client.load_model("style")
    assert _index(triton_client)[("style", "1")] == ("READY", "pinned")
    assert loraplex.get_adapter("style")["pinned"]  # the Admin API sees the same pin

    triton_client.unload_model("style")
    after = _index(triton_client)
    assert after[("style", "1")] == ("READY", "resident")  # unpinned, still in its slot, still registered
    assert not loraplex.get_adapter("style").get("pinned", False)
    assert triton_client.is_model_ready("style")
    assert text_output(triton_client.infer("style", text_inputs(PROMPT, max_tokens=2))).startswith(PROMPT)

    triton_client.load_model("summary")  # an endpoint pins its adapter version
    assert _index(triton_client)[("sum", "1")] == ("READY", "pinned")
    assert _index(triton_client)[("sum", "2")][1] != "pinned"
    triton_client.unload_model("summary")
    assert _index(triton_client)[("sum", "1")][1] != "pinned"


def test_repository_load_with_every_slot_pinned_is_resource_exhausted(triton_client):
    triton_client.load_model("sum@1")
    triton_client.load_model("sum@2")
    try:
        err = refused(triton_client.load_model, "style")
        assert err.status() == "StatusCode.RESOURCE_EXHAUSTED" and "pin" in err.message()
    finally:
        triton_client.unload_model("sum@1")
        triton_client.unload_model("sum@2")
    triton_client.load_model("style")  # a slot is free again
    triton_client.unload_model("style")


def test_repository_refusals(triton_client):
    err = refused(triton_client.load_model, "ghost")
    assert err.status() == "StatusCode.NOT_FOUND" and "'ghost'" in err.message()
    err = refused(triton_client.load_model, "sum", config='{"backend": "python"}')
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "Admin API" in err.message()
    err = refused(triton_client.unload_model, "ghost")
    assert err.status() == "StatusCode.NOT_FOUND"
    triton_client.load_model("persona")  # always resident: nothing to do, not an error
    assert _index(triton_client)[("persona", "1")] == ("READY", "resident")


# ----------------------------------------------------------------------------- tokens


ADMIN_TOKEN = "admin-secret-k"
API_KEY = "api-key-k"


@pytest.fixture(scope="module")
def auth_server(module_server_factory, tmp_path_factory, tiny_adapters):
    root = tmp_path_factory.mktemp("kserve-tokens")
    (root / "admin").write_text(ADMIN_TOKEN + "\n")
    (root / "key").write_text(API_KEY + "\n")
    srv = module_server_factory("--admin-token-file", str(root / "admin"), "--api-key-file", str(root / "key"),
                                name="kserve-auth")
    with Client(srv.target, admin_token=ADMIN_TOKEN, timeout=60) as client:
        client.register_adapter("sum", str(tiny_adapters["attn4"]))
    return srv


def test_tokens(auth_server):
    key = {"authorization": f"Bearer {API_KEY}"}
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    client = triton.InferenceServerClient(auth_server.target)
    try:
        assert client.is_server_live() and client.is_server_ready()  # probes need no secret
        for call in (lambda h: client.infer("sum", text_inputs(PROMPT, max_tokens=2), headers=h),
                     lambda h: client.get_model_metadata("sum", headers=h)):
            for headers in (None, admin):  # the admin token is not an API key
                err = refused(call, headers)
                assert err.status() == "StatusCode.UNAUTHENTICATED" and "API key" in err.message()
            assert call(key)
        for call in (lambda h: client.get_model_repository_index(headers=h),
                     lambda h: client.load_model("sum", headers=h),
                     lambda h: client.unload_model("sum", headers=h)):
            for headers in (None, key):  # the API key does not manage adapters
                err = refused(call, headers)
                assert err.status() == "StatusCode.UNAUTHENTICATED" and "admin token" in err.message()
            call(admin)
        assert [m.name for m in client.get_model_repository_index(headers=admin).models] == ["sum"]
    finally:
        client.close()
