"""The OpenAI-compatible HTTP front, driven by the real `openai` client against a real server,
and compared with `loraplex.v1` (gRPC) for the same greedy or seeded requests on the same server.

Both fronts share one engine, one validation path and one metrics registry; the same request
through either must give the same tokens (a request alone in its batch is deterministic).
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from loraplex.clients.client import Client
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc

PROMPT = "the quick brown fox"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
GREEDY = dict(temperature=0.0, max_tokens=8, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(module_server_factory, tiny_adapters):
    server = module_server_factory("--http-port", "0", name="openai")
    with Client(server.target) as client:
        client.register_adapter("sum-lora", str(tiny_adapters["attn4"]))
        client.register_adapter("persona", str(tiny_adapters["soft"]))
        client.create_endpoint("summarize", adapter="sum-lora", template="Summarize: {input}\nSummary:")
    return server


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def grpc_generate(server):
    """Send a raw loraplex.v1 GenerateRequest (every field, n and logprobs included)."""
    channel = grpc.insecure_channel(server.target)
    stub = inference_pb2_grpc.InferenceStub(channel)

    def call(**fields) -> pb.GenerateResponse:
        sampling = fields.pop("sampling", {})
        messages = fields.pop("messages", None)
        request = pb.GenerateRequest(sampling=pb.SamplingParameters(**sampling), **fields)
        if messages is not None:
            request.chat.messages.extend(pb.ChatMessage(**m) for m in messages)
        return stub.Generate(request, timeout=60)

    yield call
    channel.close()


def base_name(server) -> str:
    with Client(server.target) as client:
        return client.server_info()["model"]


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.http_url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ----------------------------------------------------------------------------- models


def test_models_list_the_base_endpoints_and_adapters_with_parents(server, oai):
    base = base_name(server)
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {base, "summarize", "sum-lora", "persona"}
    assert models[base].parent is None and models[base].kind == "base"
    assert models["sum-lora"].parent == base and models["sum-lora"].kind == "lora"
    assert models["persona"].kind == "soft_prompt"
    assert models["summarize"].parent == "sum-lora@1" and models["summarize"].kind == "endpoint"
    assert oai.models.retrieve("sum-lora").id == "sum-lora"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


# ----------------------------------------------------------------------------- parity with loraplex.v1


@pytest.mark.parametrize("model, target", [
    ("sum-lora", dict(adapter="sum-lora")),
    ("sum-lora@1", dict(adapter="sum-lora@1")),
    ("persona", dict(soft_prompt="persona")),
    ("summarize", dict(endpoint="summarize")),
    (None, {}),  # the base model, by the name the server reports
])
def test_completion_equals_grpc_for_the_same_greedy_request(server, oai, grpc_generate, model, target):
    model = model or base_name(server)
    got = oai.completions.create(model=model, prompt=PROMPT, **GREEDY)
    want = grpc_generate(prompt=PROMPT, sampling=dict(max_new_tokens=8, temperature=0.0, ignore_eos=True), **target)
    assert got.object == "text_completion" and got.model == model
    [choice] = got.choices
    assert choice.text == want.text and want.text
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert got.usage.completion_tokens == want.usage.completion_tokens == 8
    assert got.usage.total_tokens == got.usage.prompt_tokens + 8


def test_adapters_change_the_output(oai):
    texts = {m: oai.completions.create(model=m, prompt=PROMPT, **GREEDY).choices[0].text for m in ("sum-lora", "persona")}
    texts["base"] = oai.completions.create(model=oai.models.list().data[0].id, prompt=PROMPT, **GREEDY).choices[0].text
    assert len(set(texts.values())) == 3, texts


@pytest.mark.parametrize("model", ["sum-lora", "summarize"])
def test_chat_equals_grpc_for_the_same_greedy_request(oai, grpc_generate, model):
    got = oai.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    target = dict(endpoint=model) if model == "summarize" else dict(adapter=model)
    want = grpc_generate(messages=CHAT, sampling=dict(max_new_tokens=8, temperature=0.0, ignore_eos=True), **target)
    [choice] = got.choices
    assert got.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert got.usage.prompt_tokens == want.usage.prompt_tokens and got.usage.completion_tokens == 8


def test_chat_accepts_text_parts_and_max_completion_tokens(oai):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    a = oai.chat.completions.create(model="sum-lora", messages=parts, temperature=0, max_completion_tokens=5,
                                    extra_body={"ignore_eos": True})
    b = oai.chat.completions.create(model="sum-lora", messages=[{"role": "user", "content": "hello world"}],
                                    temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == 5


# ----------------------------------------------------------------------------- streaming


def test_streamed_completion_adds_up_to_the_whole_one(oai):
    whole = oai.completions.create(model="summarize", prompt=PROMPT, **GREEDY)
    chunks = list(oai.completions.create(model="summarize", prompt=PROMPT, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    assert len(chunks) > 2
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


def test_streamed_chat_adds_up_and_ends_with_done(server, oai):
    whole = oai.chat.completions.create(model="sum-lora", messages=CHAT, **GREEDY)
    chunks = list(oai.chat.completions.create(model="sum-lora", messages=CHAT, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # the raw stream: server-sent events ending with [DONE]
    body = json.dumps({"model": "sum-lora", "messages": CHAT, "stream": True, "max_tokens": 3}).encode()
    request = urllib.request.Request(server.http_url + "/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


# ----------------------------------------------------------------------------- n and logprobs


def test_n_seeded_completions_equal_grpc_n(server, oai, grpc_generate):
    sampling = dict(temperature=1.2, top_p=0.95, seed=42, max_tokens=10)
    got = oai.completions.create(model="sum-lora", prompt=PROMPT, n=3, extra_body={"ignore_eos": True}, **sampling)
    want = grpc_generate(prompt=PROMPT, adapter="sum-lora", sampling=dict(
        temperature=1.2, top_p=0.95, seed=42, max_new_tokens=10, ignore_eos=True, n=3))
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [c.text for c in want.choices]
    assert len({c.text for c in got.choices}) > 1
    assert want.text == want.choices[0].text
    with Client(server.target) as client:  # the Python client's view of the same request
        done = client.generate(PROMPT, adapter="sum-lora", temperature=1.2, top_p=0.95, seed=42, max_new_tokens=10,
                               ignore_eos=True, n=3, logprobs=True, top_logprobs=1)
    assert [c["text"] for c in done.choices] == [c.text for c in got.choices]
    assert [c["finish_reason"] for c in done.choices] == ["length"] * 3
    assert [lp["token_id"] for lp in done.logprobs] == done.token_ids and len(done.logprobs[0]["top_logprobs"]) == 1
    assert got.usage.completion_tokens == want.usage.completion_tokens == 30
    streamed = {}
    for chunk in oai.completions.create(model="sum-lora", prompt=PROMPT, n=3, stream=True,
                                        extra_body={"ignore_eos": True}, **sampling):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in got.choices]


def test_grpc_stream_carries_the_completion_index_and_each_finish_reason(server, oai):
    request = pb.GenerateRequest(prompt=PROMPT, adapter="sum-lora", sampling=pb.SamplingParameters(
        temperature=1.2, seed=7, max_new_tokens=6, ignore_eos=True, n=2, logprobs=True))
    with grpc.insecure_channel(server.target) as channel:
        events = list(inference_pb2_grpc.InferenceStub(channel).GenerateStream(request, timeout=60))
    text = {0: "", 1: ""}
    for e in events[:-1]:
        text[e.delta.index] += e.delta.text
        assert len(e.delta.logprobs) == len(e.delta.token_ids)
    end = events[-1].end
    assert list(end.finish_reasons) == [pb.FINISH_REASON_LENGTH] * 2 and end.usage.completion_tokens == 12
    got = oai.completions.create(model="sum-lora", prompt=PROMPT, n=2, temperature=1.2, seed=7, max_tokens=6,
                                 extra_body={"ignore_eos": True})
    assert [text[0], text[1]] == [c.text for c in got.choices]


def test_completion_logprobs_equal_grpc_logprobs(oai, grpc_generate):
    got = oai.completions.create(model="sum-lora", prompt=PROMPT, logprobs=3, **GREEDY)
    want = grpc_generate(prompt=PROMPT, adapter="sum-lora", sampling=dict(
        max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3))
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(want.logprobs) == 8
    assert lp.tokens == [t.token for t in want.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    for top, chosen, logprob in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy: the top token
        assert chosen in top
    if "\ufffd" not in "".join(lp.tokens):  # no token holds part of a multi-byte character
        assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_chat_logprobs_and_top_logprobs(oai, grpc_generate):
    got = oai.chat.completions.create(model="sum-lora", messages=CHAT, logprobs=True, top_logprobs=2, **GREEDY)
    want = grpc_generate(messages=CHAT, adapter="sum-lora", sampling=dict(
        max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2))
    content = got.choices[0].logprobs.content
    assert [c.token for c in content] == [t.token for t in want.logprobs]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    for c, w in zip(content, want.logprobs):
        assert [t.token for t in c.top_logprobs] == [t.token for t in w.top_logprobs]
        assert bytes(c.bytes).decode() == c.token
    plain = oai.chat.completions.create(model="sum-lora", messages=CHAT, **GREEDY)
    assert plain.choices[0].logprobs is None


# ----------------------------------------------------------------------------- refusals


def test_unknown_model_is_404_in_openais_shape(server, oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="no-such-adapter", prompt=PROMPT)
    body = err.value.body
    assert body["param"] == "model" and "no-such-adapter" in body["message"]
    assert set(body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope@3", messages=CHAT)


@pytest.mark.parametrize("kwargs, param, fragment", [
    (dict(temperature=-1), None, "temperature must be >= 0"),
    (dict(max_tokens=0), None, "max_new_tokens must be at least 1"),
    (dict(max_tokens=100000), None, "over the limit"),
    (dict(n=17), None, "n must be in [1, 16]"),
    (dict(presence_penalty=0.5), "presence_penalty", "not supported"),
    (dict(logprobs=6), "logprobs", "must be in [0, 5]"),
    (dict(extra_body={"prompt": ["a", "b"]}), "prompt", "one prompt per request"),
    (dict(extra_body={"top_k": "many"}), "top_k", "must be an integer, got string"),
    (dict(stream_options={"include_usage": True}), "stream_options", "only allowed when 'stream' is true"),
])
def test_bad_completion_parameters_are_400_naming_the_problem(oai, kwargs, param, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="sum-lora", prompt=PROMPT, **kwargs)
    assert fragment in err.value.body["message"]
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(messages=[]), "non-empty array"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "only text"),
    (dict(messages=CHAT, top_logprobs=2), "needs 'logprobs'"),
    (dict(messages=CHAT, logprobs=True, top_logprobs=21), "top_logprobs must be in [0, 20]"),
    (dict(messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}]), "'tools' is not supported"),
])
def test_bad_chat_parameters_are_400(oai, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="sum-lora", **kwargs)
    assert fragment in err.value.body["message"]


def test_malformed_http_is_answered_in_openais_shape_and_the_server_keeps_serving(server, oai):
    status, body = post(server, "/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(server, "/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = post(server, "/completions", json.dumps({"prompt": "x"}).encode())
    assert status == 400 and body["error"]["param"] == "model"
    status, body = post(server, "/nowhere", b"{}")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    assert oai.completions.create(model="sum-lora", prompt=PROMPT, **GREEDY).choices[0].text


def test_http_traffic_moves_the_shared_metrics(server, oai, api):
    before = api.scrape(server)
    oai.completions.create(model="summarize", prompt=PROMPT, **GREEDY)
    list(oai.chat.completions.create(model="summarize", messages=CHAT, stream=True, **GREEDY))
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="summarize", prompt=PROMPT, temperature=-1)
    after = api.scrape(server)

    def moved(name, **labels):
        return api.metric(after, name, **labels) - api.metric(before, name, **labels)

    assert moved("loraplex_requests_total", endpoint="summarize", status="ok") == 2
    assert moved("loraplex_requests_total", endpoint="summarize", status="invalid_argument") == 1
    assert moved("loraplex_generated_tokens_total", endpoint="summarize") == 16
    assert moved("loraplex_time_to_first_token_seconds_count", endpoint="summarize") == 2


def test_a_client_leaving_a_stream_frees_its_request(server, api):
    before = api.metric(api.scrape(server), "loraplex_requests_total", status="cancelled")
    body = json.dumps({"model": "sum-lora", "prompt": PROMPT, "stream": True, "max_tokens": 240,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(server.http_url + "/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(request, timeout=30)
    assert resp.readline().startswith(b"data: {")
    resp.close()
    api.wait_until(lambda: api.metric(api.scrape(server), "loraplex_requests_total", status="cancelled") > before,
                   timeout=20, what="the stream to be cancelled")
    assert api.metric(api.scrape(server), "loraplex_running_requests") == 0


# ----------------------------------------------------------------------------- auth and queue limit


def test_api_key_and_queue_limit(server_factory, tmp_path, api):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    server = server_factory("--http-port", "0", "--api-key-file", str(key), "--max-queue", "0", name="locked")
    wrong = openai.OpenAI(base_url=server.http_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model="x", prompt=PROMPT)
    assert err.value.status_code == 401 and "API key" in err.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    right = openai.OpenAI(base_url=server.http_url, api_key="s3cret", max_retries=0)
    assert len(right.models.list().data) == 1
    with pytest.raises(openai.RateLimitError) as err:  # --max-queue 0: every request finds the queue full
        right.completions.create(model=right.models.list().data[0].id, prompt=PROMPT, max_tokens=2)
    assert "--max-queue 0" in err.value.body["message"]
    with pytest.raises(openai.RateLimitError):
        list(right.chat.completions.create(model=right.models.list().data[0].id, messages=CHAT, stream=True))
    assert api.metric(api.scrape(server), "loraplex_requests_total", status="resource_exhausted") == 2
