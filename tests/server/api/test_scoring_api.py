"""Scoring a prompt through a real server: OpenAI's `echo` + `logprobs` + `max_tokens` 0 on
/v1/completions (what evaluation harnesses send for log-likelihoods), driven by the real
`openai` client, against PEFT's teacher-forced log-probabilities of the same tokens."""
from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoTokenizer

from loraplex.clients.client import Client

PROMPT = "the quick brown fox jumps over the lazy dog"
ATOL = 1e-4


@pytest.fixture(scope="module")
def server(module_server_factory, tiny_adapters):
    server = module_server_factory("--http-port", "0", name="scoring")
    with Client(server.target) as client:
        client.register_adapter("sum-lora", str(tiny_adapters["attn4"]))
    return server


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=60)


def base_name(server) -> str:
    with Client(server.target) as client:
        return client.server_info()["model"]


def peft_logprobs(reference, tiny_model, adapter, ids: list[int]) -> list[float]:
    model, _ = reference.load(tiny_model, adapter)
    logp = torch.log_softmax(reference.logits(model, ids), dim=-1)
    return [logp[p - 1, ids[p]].item() for p in range(1, len(ids))]


@pytest.mark.parametrize("target", ["base", "sum-lora"])
def test_echo_logprobs_with_max_tokens_0_scores_every_prompt_token(server, oai, tiny_model, tiny_adapters,
                                                                   reference, target):
    model = base_name(server) if target == "base" else target
    out = oai.completions.create(model=model, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    lp = choice.logprobs
    assert "".join(lp.tokens) == PROMPT and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs[1:],
                                                                                lp.token_logprobs[1:]))
    ids = AutoTokenizer.from_pretrained(tiny_model)(PROMPT)["input_ids"]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    want = peft_logprobs(reference, tiny_model, tiny_adapters["attn4"] if target != "base" else None, ids)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), torch.tensor(want), atol=ATOL, rtol=0)


def test_echo_with_logprobs_needs_max_tokens_0_and_no_stream(server, oai):
    model = base_name(server)
    with pytest.raises(openai.BadRequestError, match="needs 'max_tokens' 0"):
        oai.completions.create(model=model, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="is not streamed"):
        oai.completions.create(model=model, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, stream=True)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens must be at least 1"):
        oai.completions.create(model=model, prompt=PROMPT, max_tokens=0)


# ----------------------------------------------------------------------------- loraplex.v1 Score


def test_score_gives_each_continuation_token_its_peft_logprob(server, tiny_model, tiny_adapters, reference):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    context, continuation = "the quick brown", " fox jumps over the lazy dog"
    ids = tokenizer(context)["input_ids"]
    more = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with Client(server.target, timeout=60) as client:
        scored = client.score(context, continuation, adapter="sum-lora", top_logprobs=3)
        base = client.score(context, continuation)
    assert [t["token_id"] for t in scored.tokens] == more and scored.prompt_tokens == len(ids) + len(more)
    assert scored.adapter == "sum-lora@1" and base.adapter == ""
    assert all(len(t["top_logprobs"]) == 3 for t in scored.tokens)
    got = torch.tensor([t["logprob"] for t in scored.tokens])
    want = torch.tensor(peft_logprobs(reference, tiny_model, tiny_adapters["attn4"], ids + more)[len(ids) - 1:])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert abs(scored.total_logprob - float(got.sum())) < 1e-3
    assert abs(scored.total_logprob - base.total_logprob) > 0.01  # the adapter's own distribution


def test_score_scores_a_chat_answer_in_the_chat_format(server, tiny_model, reference):
    """An answer scored after a chat follows the chat template with its generation prompt, as
    Generate applies them: PEFT's log-probabilities of the answer after those very tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chat, answer = [{"role": "user", "content": "name a fox"}], "the quick brown fox"
    with Client(server.target, timeout=60) as client:
        scored = client.score(messages=chat, continuation=answer)
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own specials
    more = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert [t["token_id"] for t in scored.tokens] == more
    want = torch.tensor(peft_logprobs(reference, tiny_model, None, ids + more)[len(ids) - 1:])
    torch.testing.assert_close(torch.tensor([t["logprob"] for t in scored.tokens]), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fields, fragment", [
    ({"prompt": "the quick", "continuation": ""}, "the continuation is empty"),
    ({"continuation": "fox"}, "give exactly one of prompt or messages"),
    ({"prompt": "the quick", "continuation": "fox", "adapter": "nope"}, "nope"),
])
def test_malformed_score_requests_are_refused(server, fields, fragment):
    from loraplex.clients.client import LoraplexError

    prompt = fields.pop("prompt", None)
    with Client(server.target, timeout=60) as client:
        with pytest.raises((LoraplexError, ValueError)) as info:
            client.score(prompt, **fields)
    assert fragment in str(info.value), info.value


def test_the_async_client_scores_the_same(server):
    import asyncio

    from loraplex.clients.aio import AsyncClient

    async def score():
        async with AsyncClient(server.target) as client:
            return await client.score("the quick brown", " fox", adapter="sum-lora", top_logprobs=1)

    with Client(server.target, timeout=60) as client:
        want = client.score("the quick brown", " fox", adapter="sum-lora", top_logprobs=1)
    got = asyncio.run(score())
    assert (got.tokens, got.total_logprob, got.adapter) == (want.tokens, want.total_logprob, want.adapter)
