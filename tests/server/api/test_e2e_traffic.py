"""End to end: a real `loraplex serve` process, adapters and endpoints registered at run time,
many concurrent streamed requests across them, and every output checked against offline
`loraplex generate` on the same effective inputs.

Numerics (docs/ARCHITECTURE.md, "Numerics in tests"): requests share batches in the server
but not offline, so summation order differs and near-ties may flip. Each request's
teacher-forced top-1/top-2 margins come from an in-process Engine fed the server's tokens;
tokens are compared only up to the first generated position whose margin is below MARGIN.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraplex.clients.aio import AsyncClient
from loraplex.clients.client import Client

MARGIN = 1e-3
TIMEOUT = 180

# server name -> (fixture adapter, how it is registered)
ADAPTERS = {
    "summarize-lora": ("attn4", "upload"),
    "sql-lora": ("mlp8", "path"),
    "wide-lora": ("all16", "upload"),
    "style-lora": ("rs2", "path"),
    "persona": ("soft", "upload"),  # the soft prompt
}
ENDPOINTS = {
    "summarize": dict(adapter="summarize-lora", template="Summarize: {input}\nSummary:",
                      defaults={"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}),
    "assistant": dict(adapter="sql-lora", template="{input} (answer in SQL)", system_message="You write SQL.",
                      defaults={"max_new_tokens": 10, "ignore_eos": True}),
    "styled": dict(adapter="style-lora", soft_prompt="persona", template="Q: {input}\nA:",
                   defaults={"max_new_tokens": 16, "ignore_eos": True, "temperature": 0.0}),
}
PROMPTS = ["the quick brown fox", "hello world, this is", "SELECT name FROM users", "translate to French: good",
           "jumps over the lazy dog", "serving many adapters"]


@dataclass
class Case:
    """One request: what the client sends, and the same request as offline input."""

    send: dict  # AsyncClient.stream keyword arguments
    offline: dict  # one `loraplex generate` JSONL line: the effective prompt or messages, names, length
    served_by: tuple[str, str, str]  # expected (endpoint, adapter, soft_prompt)
    events: list = field(default_factory=list)


def _cases() -> list[Case]:
    cases: list[Case] = []
    # endpoint with a template and defaults (length, greedy, ignore_eos come from the endpoint)
    for i, p in enumerate(PROMPTS):
        send = dict(prompt=p, endpoint="summarize")
        n = 12
        if i % 3 == 2:  # the request's own max_new_tokens wins over the endpoint's default
            send["max_new_tokens"] = n = 5
        cases.append(Case(send, dict(prompt=f"Summarize: {p}\nSummary:", adapter="summarize-lora", max_new_tokens=n),
                          ("summarize", "summarize-lora@1", "")))
    # endpoint with a system message for chat requests; the template wraps the last user turn
    chats = [
        [{"role": "user", "content": "list the users"}],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
         {"role": "user", "content": "count rows"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the quick brown fox"}],
        [{"role": "user", "content": "SELECT name"}],
    ]
    for msgs in chats:
        effective = [dict(m) for m in msgs]
        last_user = max(i for i, m in enumerate(effective) if m["role"] == "user")
        effective[last_user]["content"] = f"{effective[last_user]['content']} (answer in SQL)"
        if not any(m["role"] == "system" for m in effective):
            effective.insert(0, {"role": "system", "content": "You write SQL."})
        cases.append(Case(dict(messages=msgs, endpoint="assistant"),
                          dict(messages=effective, adapter="sql-lora", max_new_tokens=10),
                          ("assistant", "sql-lora@1", "")))
    # endpoint with an adapter and a soft prompt
    for p in PROMPTS[:4]:
        cases.append(Case(dict(prompt=p, endpoint="styled"),
                          dict(prompt=f"Q: {p}\nA:", adapter="style-lora", soft_prompt="persona", max_new_tokens=16),
                          ("styled", "style-lora@1", "persona@1")))
    # adapters named directly, soft prompt alone, and the base model
    direct = [
        (dict(adapter="wide-lora"), ("", "wide-lora@1", "")),
        (dict(adapter="style-lora@1", soft_prompt="persona"), ("", "style-lora@1", "persona@1")),
        (dict(adapter="summarize-lora@1"), ("", "summarize-lora@1", "")),
        (dict(soft_prompt="persona@1"), ("", "", "persona@1")),
        ({}, ("", "", "")),
    ]
    for i, p in enumerate(PROMPTS):
        for j, (what, served) in enumerate(direct):
            if (i + j) % 3 == 2:
                continue
            n = 8 + (i + j) % 7
            send = dict(prompt=p, max_new_tokens=n, temperature=0.0, ignore_eos=True, **what)
            offline = dict(prompt=p, max_new_tokens=n)
            if "adapter" in what:
                offline["adapter"] = what["adapter"].split("@")[0]
            if "soft_prompt" in what:
                offline["soft_prompt"] = what["soft_prompt"].split("@")[0]
            cases.append(Case(send, offline, served))
    return cases


def _offline(model: Path, adapters: dict[str, Path], cases: list[Case], work: Path) -> list[dict]:
    """`loraplex generate --json` on every case's offline line (one subprocess)."""
    (work / "in.jsonl").write_text("".join(json.dumps(c.offline) + "\n" for c in cases), encoding="utf-8")
    args = ["--model", str(model), "--input", "in.jsonl", "--json", "--threads", "1", "--temperature", "0"]
    for name, (fixture, _) in ADAPTERS.items():
        args += ["--soft-prompt" if fixture == "soft" else "--adapter", f"{name}={adapters[fixture]}"]
    proc = subprocess.run([sys.executable, "-m", "loraplex.clients.cli", "generate", *args], cwd=work,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(cases), proc.stdout
    return lines


def _register(client: Client, adapters: dict[str, Path]) -> None:
    for name, (fixture, how) in ADAPTERS.items():
        if how == "upload":
            info = client.upload_adapter(name, adapters[fixture], chunk_size=4096)  # several chunks per file
        else:
            info = client.register_adapter(name, str(adapters[fixture]))
        assert (info["name"], info["version"]) == (name, 1)
        assert info["kind"] == ("ADAPTER_KIND_SOFT_PROMPT" if fixture == "soft" else "ADAPTER_KIND_LORA")
    for name, spec in ENDPOINTS.items():
        created = client.create_endpoint(name, **spec)
        assert created["adapter"] == f"{spec['adapter']}@1"  # "name" resolved to its latest version


async def _fire(target: str, cases: list[Case]) -> None:
    async with AsyncClient(target, timeout=TIMEOUT) as client:
        async def one(case: Case) -> None:
            case.events = [event async for event in client.stream(**case.send)]

        await asyncio.gather(*(one(c) for c in cases))


@pytest.fixture(scope="module")
def traffic(module_server_factory, tiny_model, tiny_adapters, tmp_path_factory):
    server = module_server_factory(name="e2e")
    cases = _cases()
    with Client(server.target, timeout=60) as client:
        _register(client, tiny_adapters)
    asyncio.run(asyncio.wait_for(_fire(server.target, cases), TIMEOUT))
    offline = _offline(tiny_model, tiny_adapters, cases, tmp_path_factory.mktemp("offline"))
    return server, cases, offline


@pytest.fixture(scope="module")
def margins(traffic, tiny_model, tiny_adapters):
    """Per case: the teacher-forced margin and argmax at each generated position, and the
    prompt ids the engine builds for the case's effective input."""
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.sequence import Request

    _, cases, _ = traffic
    engine = Engine(EngineConfig(model=str(tiny_model), threads=1))
    for name, (fixture, _) in ADAPTERS.items():
        engine.register_adapter(name, str(tiny_adapters[fixture]))
    tok = engine.tokenizer
    requests, prompts = [], []
    for case in cases:
        line = case.offline
        if "prompt" in line:
            ids = tok(line["prompt"])["input_ids"]
        else:
            text = tok.apply_chat_template(line["messages"], add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        generated = [i for e in case.events for i in e.token_ids]
        prompts.append(ids)
        requests.append(Request(prompt_token_ids=ids + generated, adapter=line.get("adapter"),
                                soft_prompt=line.get("soft_prompt")))
    out = []
    for ids, case, logits in zip(prompts, cases, engine.prompt_logits(requests)):
        n = sum(len(e.token_ids) for e in case.events)
        steps = logits[len(ids) - 1: len(ids) - 1 + n]
        top2 = steps.topk(2, dim=-1).values
        out.append(dict(prompt_ids=ids, margins=(top2[:, 0] - top2[:, 1]).tolist(),
                        argmax=steps.argmax(dim=-1).tolist()))
    return out


def _cutoff(m: list[float]) -> int:
    return next((i for i, x in enumerate(m) if x < MARGIN), len(m))


def test_at_least_32_concurrent_streams_over_every_kind_of_target(traffic, api):
    server, cases, _ = traffic
    assert len(cases) >= 32
    # they really ran together: some engine steps batched more than 8 sequences
    text = api.scrape(server)
    assert "8.0" in api.label_values(text, "loraplex_batch_size_bucket", "le")
    assert api.metric(text, "loraplex_batch_size_bucket", le="8.0") < api.metric(text, "loraplex_batch_size_count")
    assert "Traceback" not in server.output()
    kinds = {c.served_by for c in cases}
    assert {s[0] for s in kinds} >= {"summarize", "assistant", "styled", ""}
    assert ("", "", "") in kinds and ("", "", "persona@1") in kinds and ("", "wide-lora@1", "") in kinds
    assert any("messages" in c.send for c in cases)


def test_stream_messages_carry_request_id_and_served_by(traffic):
    _, cases, _ = traffic
    ids = set()
    for case in cases:
        events = case.events
        assert len(events) >= 2, case.send
        request_ids = {e.request_id for e in events}
        assert len(request_ids) == 1 and "" not in request_ids, case.send
        ids |= request_ids
        for e in events:
            assert (e.served_by.endpoint, e.served_by.adapter, e.served_by.soft_prompt) == case.served_by, case.send
    assert len(ids) == len(cases)  # every request got its own id


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_stream_deltas_concatenate_to_the_final_answer(traffic, margins, tokenizer):
    _, cases, _ = traffic
    for case, m in zip(cases, margins):
        *deltas, end = case.events
        assert end.is_final and end.finish_reason == "length", case.send
        assert not any(d.is_final for d in deltas)
        ids = [i for d in deltas for i in d.token_ids]
        n = case.offline["max_new_tokens"]
        # fixed length with ignore_eos: every request ran to its max_new_tokens
        assert len(ids) == end.completion_tokens == n, case.send
        assert end.prompt_tokens == len(m["prompt_ids"]), case.send  # the effective prompt is the expected one
        # the text is the detokenization of the ids, delivered in pieces
        text = "".join(d.text for d in deltas)
        assert text == tokenizer.decode(ids, skip_special_tokens=True), case.send


def test_outputs_equal_offline_generate(traffic, margins):
    _, cases, offline = traffic
    total = compared_offline = compared_forced = 0
    for case, line, m in zip(cases, offline, margins):
        assert "error" not in line, (case.offline, line)
        server_ids = [i for e in case.events for i in e.token_ids]
        cut = _cutoff(m["margins"])
        total += len(server_ids)
        # the server's tokens are the greedy ones under teacher forcing, up to the first near-tie
        assert server_ids[:cut] == m["argmax"][:cut], case.send
        compared_forced += cut
        # offline has no ignore_eos: it may stop at an EOS, which the server generated too
        n = min(cut, len(line["token_ids"]))
        assert server_ids[:n] == line["token_ids"][:n], (case.send, case.offline)
        compared_offline += n
        if n == len(server_ids) == len(line["token_ids"]):
            assert "".join(e.text for e in case.events) == line["text"], case.send
        if line["finish_reason"] == "length":
            assert len(line["token_ids"]) == case.offline["max_new_tokens"]
    # the cutoff must leave most tokens compared, or this test would pass vacuously
    assert compared_forced >= 0.9 * total, (compared_forced, total)
    assert compared_offline >= 0.75 * total, (compared_offline, total)


def test_different_targets_give_different_outputs(traffic):
    """The adapters really change the output (otherwise the comparisons above prove little)."""
    _, cases, _ = traffic
    by_target: dict[tuple, list[int]] = {}
    for case in cases:
        if case.send.get("prompt") == PROMPTS[0] and "endpoint" not in case.send:
            by_target[case.served_by] = [i for e in case.events for i in e.token_ids][:8]
    assert len(by_target) >= 3
    assert len({tuple(v) for v in by_target.values()}) == len(by_target), by_target


def test_unary_generate_equals_the_stream(traffic, margins):
    """Generate (unary) answers what GenerateStream streamed, for one case of each target."""
    server, cases, _ = traffic
    seen = set()
    with Client(server.target, timeout=TIMEOUT) as client:
        for case, m in zip(cases, margins):
            if case.served_by in seen:
                continue
            seen.add(case.served_by)
            got = client.generate(**case.send)
            streamed = [i for e in case.events for i in e.token_ids]
            cut = _cutoff(m["margins"])
            assert got.token_ids[:cut] == streamed[:cut], case.send
            if cut == len(streamed):
                assert got.text == "".join(e.text for e in case.events)
            assert (got.endpoint, got.adapter, got.soft_prompt) == case.served_by
            assert got.finish_reason == "length" and got.completion_tokens == len(streamed)
            assert got.request_id and got.request_id not in {e.request_id for e in case.events}
    assert len(seen) >= 7
