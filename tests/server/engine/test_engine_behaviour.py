"""Engine behaviour beyond one static batch: continuous batching, limits, preemption by
recomputation, refusals, failures that stay with their request, sampling, stop strings, EOS,
chat, abort, streaming deltas, other Llama-family models, dtypes and quantization.

Every expectation is relative: a request in a busy engine against the same request alone on a
roomy engine, a stopped run against the same run without the stop, the engine against the
Hugging Face / PEFT reference. Greedy runs of the tiny model (initializer_range 0.3) have wide
top-1/top-2 margins, so summation-order differences between batch shapes (~1e-6) never flip a
token; the checks against PEFT stop at the first near-tie, as the design asks.
"""
from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.intake import RequestError
from loraplex.server.engine.workload import Completion
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request, RequestOutput


ATOL = 1e-4  # float32 logits against the reference, absolute
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

PROMPTS = [
    [5, 17, 42, 99, 7, 11, 3, 250, 64, 33],
    [11, 3, 250, 64, 33, 8, 91, 120, 18, 77],
    [200, 12, 7, 7, 19, 140, 66, 5, 81, 9],
    [44, 10, 9, 81, 5, 66, 140, 19, 7, 7],
    [300, 301, 302, 15, 16, 17, 90, 91, 92, 93],
    [60, 61, 62, 63, 64, 65, 66, 67, 68, 69],
]


# ----------------------------------------------------------------------------- helpers


def make_engine(model_dir, adapters=None, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    kw.setdefault("max_total_tokens", 2048)
    engine = Engine(EngineConfig(model=str(model_dir), **kw))
    for name, path in (adapters or {}).items():
        engine.register_adapter(name, str(path))
    return engine


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **kw)


def req(i: int, adapter=None, soft=None, new=8, rid=None, **params) -> Request:
    params.setdefault("ignore_eos", True)
    return Request(prompt_token_ids=list(PROMPTS[i % len(PROMPTS)]), adapter=adapter, soft_prompt=soft,
                   params=SamplingParams(max_new_tokens=new, **params), request_id=rid)


def solo(engine: Engine, request: Request) -> Completion:
    """`request` alone on `engine` (which must be idle)."""
    assert not engine.has_unfinished()
    [done] = engine.generate([request])
    assert done.error is None, done.error
    return done


class Driver:
    """Drives `step()` by hand, collecting every output."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps: list[list[RequestOutput]] = []
        self.text: dict[str, str] = {}
        self.ids: dict[str, list[int]] = {}
        self.final: dict[str, RequestOutput] = {}

    def add(self, request: Request) -> str:
        rid = self.engine.add_request(request)
        self.text.setdefault(rid, "")
        self.ids.setdefault(rid, [])
        return rid

    def step(self, check=None) -> list[RequestOutput]:
        outs = self.engine.step()
        self.steps.append(outs)
        for out in outs:
            assert out.request_id not in self.final, f"output for {out.request_id} after it finished"
            self.text[out.request_id] += out.text
            self.ids[out.request_id] += out.token_ids
            if out.finished:
                self.final[out.request_id] = out
        if check is not None:
            check(self.engine, outs)
        return outs

    def run(self, check=None, limit: int = 2000) -> None:
        for _ in range(limit):
            if not self.engine.has_unfinished():
                return
            self.step(check)
        raise AssertionError(f"engine still busy after {limit} steps")


def assert_idle_and_clean(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    assert engine._seqs == {}


@pytest.fixture(scope="module")
def roomy(tiny_model, tiny_adapters) -> Engine:
    """A roomy engine: the 'alone' runs, and refusal checks (each test leaves it idle)."""
    return make_engine(tiny_model, tiny_adapters)


@pytest.fixture(scope="module")
def solo_cache(roomy):
    cache: dict = {}

    def run(request: Request) -> Completion:
        p = request.params
        key = (tuple(request.prompt_token_ids or ()), request.prompt, request.adapter, request.soft_prompt,
               p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.ignore_eos)
        if key not in cache:
            clone = Request(prompt=request.prompt, messages=request.messages,
                            prompt_token_ids=request.prompt_token_ids, adapter=request.adapter,
                            soft_prompt=request.soft_prompt, params=request.params)
            cache[key] = solo(roomy, clone)
        return cache[key]

    return run


# ----------------------------------------------------------------------------- continuous batching


def test_requests_joining_mid_decode_match_their_solo_runs(tiny_model, tiny_adapters, solo_cache):
    engine = make_engine(tiny_model, tiny_adapters)
    early = [req(0, new=12, rid="early-base"), req(1, "attn4", new=12, rid="early-attn4"),
             req(2, None, "soft", new=12, rid="early-soft")]
    late = [req(3, "mlp8", new=8, rid="late-mlp8"), req(4, "all16", "soft", new=8, rid="late-all16-soft"),
            req(5, "rs2", new=8, rid="late-rs2")]
    # host-cached first: how long the low-priority background read takes is not what this tests
    engine.slots.read_ahead(["mlp8", "all16", "rs2"])
    d = Driver(engine)
    for r in early:
        d.add(r)
    for _ in range(4):  # a prefill and three decodes
        d.step()
    assert engine.scheduler.running and all(not o.finished for o in d.steps[-1])
    for r in late:
        d.add(r)
    d.run()

    early_ids, late_ids = {r.request_id for r in early}, {r.request_id for r in late}
    overlapped = [s for s in d.steps
                  if early_ids & {o.request_id for o in s} and late_ids & {o.request_id for o in s}]
    assert overlapped, "late requests never shared a step with early ones"
    # the late requests' prefill ran while the early ones were still unfinished
    late_prefill = next(i for i, s in enumerate(d.steps) if late_ids & {o.request_id for o in s})
    assert any(o.request_id in early_ids for s in d.steps[late_prefill + 1:] for o in s)

    for r in early + late:
        alone = solo_cache(r)
        assert d.final[r.request_id].finish_reason == "length"
        assert d.ids[r.request_id] == alone.token_ids, r.request_id
        assert d.text[r.request_id] == alone.text, r.request_id
        assert len(alone.token_ids) == r.params.max_new_tokens
    assert engine.scheduler.num_preemptions == 0
    assert_idle_and_clean(engine)


def test_max_running_caps_every_step(tiny_model, tiny_adapters, solo_cache):
    engine = make_engine(tiny_model, tiny_adapters, max_running=2)
    requests = [req(i, a, s, new=6 + i, rid=f"r{i}")
                for i, (a, s) in enumerate([(None, None), ("attn4", None), (None, "soft"),
                                            ("mlp8", "soft"), ("all16", None)])]
    d = Driver(engine)
    for r in requests:
        d.add(r)
    seen_running = []

    def check(eng, outs):
        assert len(eng.scheduler.running) <= 2
        assert len({o.request_id for o in outs}) <= 2
        seen_running.append(len(eng.scheduler.running))

    d.run(check)
    assert max(seen_running) == 2  # the cap was reached, not just respected by idling
    for r in requests:
        assert d.final[r.request_id].finish_reason == "length"
        assert d.ids[r.request_id] == solo_cache(r).token_ids, r.request_id
    assert_idle_and_clean(engine)


def test_max_batch_tokens_splits_prefills(tiny_model, tiny_adapters, solo_cache):
    # no prefix cache: "long" begins with a's prompt, and would start where a's blocks end
    engine = make_engine(tiny_model, tiny_adapters, max_batch_tokens=12, prefix_caching=False)
    prefills: list[list[tuple[str, int, int]]] = []  # per step: (request, start, length) of prefill chunks
    run = engine.runner.run

    def recording(chunks):
        prefills.append([(c.seq.request_id, c.start, c.length) for c in chunks if not c.is_decode])
        return run(chunks)

    engine.runner.run = recording
    long_prompt = Request(prompt_token_ids=PROMPTS[0] + PROMPTS[1], params=greedy(4), request_id="long")
    requests = [req(0, new=5, rid="a"), req(1, "attn4", new=5, rid="b"), req(2, None, "soft", new=5, rid="c"),
                long_prompt]
    results = engine.generate(requests)
    assert all(r.error is None for r in results)
    # no step computes more than 12 prompt positions; a prompt that does not fit takes what is left
    # and continues in the next steps, the 20-token one too (no exception for a lone long prompt)
    assert all(sum(n for _, _, n in step) <= 12 for step in prefills), prefills
    assert prefills[0] == [("a", 0, 10), ("b", 0, 2)]
    long_chunks = [(start, n) for step in prefills for rid, start, n in step if rid == "long"]
    assert len(long_chunks) > 1 and sum(n for _, n in long_chunks) == 20, long_chunks
    assert [start for start, _ in long_chunks] == [sum(n for _, n in long_chunks[:i]) for i in range(len(long_chunks))]
    for r, got in zip(requests, results):
        assert got.token_ids == solo_cache(r).token_ids

    # with room for two 10-token prompts per step, two prefills suffice for four prompts (the
    # second one shares its step with the first two requests' decodes; a fixed chunk budget, as the
    # auto one would be 2 decodes + 16 there)
    engine2 = make_engine(tiny_model, tiny_adapters, max_batch_tokens=20, prefill_chunk_tokens=256)
    prefills.clear()
    run = engine2.runner.run
    engine2.runner.run = recording
    results = engine2.generate([req(i, new=3) for i in range(4)])
    assert all(r.error is None for r in results)
    assert [[n for _, _, n in step] for step in prefills if step] == [[10, 10], [10, 10]]


# ----------------------------------------------------------------------------- preemption


def test_preemption_recomputes_lora_and_soft_prompt_sequences(tiny_model, tiny_adapters, solo_cache):
    # 16 blocks of 4 = 64 KV positions; six requests of 10 (+5 virtual for soft) prompt tokens and
    # 12 new tokens need 22-27 KV positions each, 146 in all: some must be preempted and recomputed.
    engine = make_engine(tiny_model, tiny_adapters, block_size=4, max_total_tokens=64)
    mix = [(None, None), ("attn4", None), ("mlp8", None), ("rs2", None), (None, "soft"), ("all16", "soft")]
    for name in ("attn4", "mlp8", "rs2", "all16"):  # resident already, so no request waits for a read
        engine.slots.pin(name)
        engine.slots.unpin(name)
    requests = [req(i, a, s, new=12, rid=f"p{i}") for i, (a, s) in enumerate(mix)]
    # the newest is sampled with a seed: recomputing its prefix must not consume its random stream
    requests[5].params = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8, top_k=40, seed=99)
    d = Driver(engine)
    seqs = {}
    for r in requests:
        rid = d.add(r)
        seqs[rid] = engine._seqs[rid][0]  # the request's only sequence (n = 1)
    d.run()

    assert engine.scheduler.num_preemptions > 0
    preempted = {rid for rid, s in seqs.items() if s.num_preemptions}
    # the newest sequences go first: both soft-prompt ones (p5 also has a LoRA and a seed)
    assert {"p4", "p5"} <= preempted, f"soft-prompt sequences not preempted: {preempted}"
    for r in requests:
        out = d.final[r.request_id]
        assert out.error is None and out.finish_reason == "length", (r.request_id, out.error)
        alone = solo_cache(r)
        assert d.ids[r.request_id] == alone.token_ids, r.request_id
        assert d.text[r.request_id] == alone.text, r.request_id
    assert_idle_and_clean(engine)


# ----------------------------------------------------------------------------- refusals

REFUSALS = [
    ("context", lambda: Request(prompt_token_ids=PROMPTS[0], params=greedy(247)), "beyond the model's context of 256"),
    ("context-soft", lambda: Request(prompt_token_ids=PROMPTS[0], soft_prompt="soft", params=greedy(242)),
     "plus 5 soft-prompt tokens"),
    ("empty-text", lambda: Request(prompt="", params=greedy(4)), "empty"),
    ("empty-ids", lambda: Request(prompt_token_ids=[], params=greedy(4)), "empty"),
    ("id-too-big", lambda: Request(prompt_token_ids=[5, 320], params=greedy(4)), "out of range"),
    ("id-negative", lambda: Request(prompt_token_ids=[-1, 5], params=greedy(4)), "out of range"),
    ("id-not-int", lambda: Request(prompt_token_ids=[5, 1.5], params=greedy(4)), "out of range"),
    ("prompt-and-messages", lambda: Request(prompt="hi", messages=[{"role": "user", "content": "hi"}]),
     "exactly one of"),
    ("nothing", lambda: Request(), "exactly one of"),
    ("prompt-not-str", lambda: Request(prompt=123), "prompt must be a string"),
    ("unknown-adapter", lambda: Request(prompt="hi", adapter="nope"), "unknown LoRA adapter 'nope'"),
    ("unknown-soft", lambda: Request(prompt="hi", soft_prompt="nope"), "unknown soft prompt 'nope'"),
    ("soft-as-adapter", lambda: Request(prompt="hi", adapter="soft"), "'soft' is a soft prompt, not a LoRA adapter"),
    ("lora-as-soft", lambda: Request(prompt="hi", soft_prompt="attn4"), "'attn4' is a LoRA adapter, not a soft prompt"),
    ("temperature", lambda: Request(prompt="hi", params=SamplingParams(temperature=-1)), "temperature"),
    ("top_p", lambda: Request(prompt="hi", params=SamplingParams(top_p=0)), "top_p"),
    ("top_k", lambda: Request(prompt="hi", params=SamplingParams(top_k=-3)), "top_k"),
    ("max_new_tokens", lambda: Request(prompt="hi", params=SamplingParams(max_new_tokens=0)), "max_new_tokens"),
    ("stop", lambda: Request(prompt="hi", params=SamplingParams(stop=("",))), "stop"),
    ("messages-not-list", lambda: Request(messages="hi"), "messages"),
    ("messages-empty", lambda: Request(messages=[]), "messages"),
    ("messages-no-content", lambda: Request(messages=[{"role": "user"}]), "messages[0]"),
    ("messages-bad-content", lambda: Request(messages=[{"role": "user", "content": "a"}, {"role": "x", "content": 3}]),
     "messages[1]"),
    ("messages-not-dict", lambda: Request(messages=["hi"]), "messages[0]"),
]


def assert_serves(engine: Engine, solo_cache=None) -> None:
    """A normal request still completes (and, given the solo reference, with the same tokens)."""
    r = req(2, "attn4", "soft", new=5)
    [done] = engine.generate([r])
    assert done.error is None and done.finish_reason == "length" and len(done.token_ids) == 5
    if solo_cache is not None:
        assert done.token_ids == solo_cache(r).token_ids
    assert_idle_and_clean(engine)


@pytest.mark.parametrize("make, fragment", [(m, f) for _, m, f in REFUSALS], ids=[n for n, _, _ in REFUSALS])
def test_refusals_name_the_problem_and_leave_the_engine_serving(roomy, solo_cache, make, fragment):
    with pytest.raises(RequestError) as info:
        roomy.add_request(make())
    assert fragment in str(info.value)
    assert_idle_and_clean(roomy)  # nothing queued, nothing allocated
    # generate() turns the same refusal into that request's error
    [refused] = roomy.generate([make()])
    assert refused.finish_reason == "error" and fragment in refused.error
    assert_serves(roomy, solo_cache)


def test_soft_prompt_named_as_adapter_says_so(roomy):
    with pytest.raises(RequestError) as info:
        roomy.add_request(Request(prompt="hi", adapter="soft"))
    message = str(info.value)
    assert "'soft'" in message and "LoRA" in message


def test_context_limit_edges(roomy, tiny_model):
    # exactly at the context: accepted (10 prompt + 246 new = 256)
    roomy.add_request(Request(prompt_token_ids=PROMPTS[0], params=greedy(246), request_id="edge"))
    roomy.abort("edge")
    assert_idle_and_clean(roomy)

    small = make_engine(tiny_model, max_model_len=32)
    assert small.max_model_len == 32
    with pytest.raises(RequestError, match="beyond the model's context of 32"):
        small.add_request(Request(prompt_token_ids=PROMPTS[0], params=greedy(23)))
    [done] = small.generate([Request(prompt_token_ids=PROMPTS[0], params=greedy(22))])
    assert done.error is None and len(done.token_ids) == 22
    assert_idle_and_clean(small)

    # max_model_len can only lower the model's own context
    big = make_engine(tiny_model, max_model_len=1000)
    assert big.max_model_len == 256
    with pytest.raises(RequestError, match="context of 256"):
        big.add_request(Request(prompt_token_ids=PROMPTS[0], params=greedy(247)))


def test_beyond_kv_capacity_is_refused(tiny_model, tiny_adapters):
    engine = make_engine(tiny_model, tiny_adapters, block_size=4, max_total_tokens=32)
    with pytest.raises(RequestError) as info:
        engine.add_request(Request(prompt_token_ids=PROMPTS[0], params=greedy(23)))
    assert "33 tokens of KV cache" in str(info.value) and "holds 32" in str(info.value)
    # virtual tokens count too: 5 + 10 + 18 = 33
    with pytest.raises(RequestError, match="KV cache"):
        engine.add_request(Request(prompt_token_ids=PROMPTS[0], soft_prompt="soft", params=greedy(18)))
    [done] = engine.generate([Request(prompt_token_ids=PROMPTS[0], soft_prompt="soft", params=greedy(17))])
    assert done.error is None and len(done.token_ids) == 17
    assert_serves(engine)


def test_duplicate_request_id_in_flight(roomy, solo_cache):
    first = req(0, new=4, rid="dup")
    roomy.add_request(first)
    with pytest.raises(RequestError, match="'dup' is already in flight"):
        roomy.add_request(req(1, "attn4", new=4, rid="dup"))
    d = Driver(roomy)
    d.ids["dup"], d.text["dup"] = [], ""
    d.run()
    assert d.ids["dup"] == solo_cache(first).token_ids  # the refused twin did not disturb the first
    # once finished, the id is free again
    [again] = roomy.generate([req(1, "attn4", new=4, rid="dup")])
    assert again.error is None and again.request_id == "dup"
    assert_idle_and_clean(roomy)


# ----------------------------------------------------------------------------- failures stay with their request


def test_generate_with_unknown_adapter_mid_batch(roomy):
    good = [req(0, "attn4", new=6), req(1, None, "soft", new=6), req(2, "all16", new=6)]
    baseline = roomy.generate(good)
    mixed = [good[0], req(3, "nope", new=6), good[1], req(4, None, "nope", new=6), good[2]]
    results = roomy.generate(mixed)
    assert [r.error is None for r in results] == [True, False, True, False, True]
    assert "unknown LoRA adapter 'nope'" in results[1].error and results[1].finish_reason == "error"
    assert "unknown soft prompt 'nope'" in results[3].error
    for base, got in zip(baseline, [results[0], results[2], results[4]]):
        assert got.token_ids == base.token_ids and got.text == base.text and got.finish_reason == "length"
    assert_idle_and_clean(roomy)


def test_adapter_deleted_after_registration_fails_alone(tiny_model, tiny_adapters, tmp_path, solo_cache):
    engine = make_engine(tiny_model, tiny_adapters)
    gone = tmp_path / "gone"
    shutil.copytree(tiny_adapters["mlp8"], gone)
    engine.register_adapter("gone", str(gone))
    shutil.rmtree(gone)
    requests = [req(0, "attn4", new=6), req(1, "gone", new=6), req(2, None, "soft", new=6), req(3, new=6)]
    results = engine.generate(requests)
    assert results[1].finish_reason == "error" and "'gone'" in results[1].error, results[1].error
    for r, got in zip([requests[i] for i in (0, 2, 3)], [results[i] for i in (0, 2, 3)]):
        assert got.error is None and got.token_ids == solo_cache(r).token_ids
    # the failed load left no slot or block behind: the engine keeps serving, every adapter included
    assert_serves(engine, solo_cache)
    [again] = engine.generate([req(1, "gone", new=2)])
    assert again.error and "'gone'" in again.error


def test_deleted_adapter_with_one_slot_does_not_wedge(tiny_model, tiny_adapters, tmp_path, solo_cache):
    engine = make_engine(tiny_model, tiny_adapters, max_loras=1)
    gone = tmp_path / "gone"
    shutil.copytree(tiny_adapters["attn4"], gone)
    engine.register_adapter("gone", str(gone))
    shutil.rmtree(gone)
    requests = [req(0, "mlp8", new=4), req(1, "gone", new=4), req(2, "all16", new=4)]
    results = engine.generate(requests)
    assert results[1].error and "'gone'" in results[1].error
    for i in (0, 2):
        assert results[i].token_ids == solo_cache(requests[i]).token_ids
    assert_idle_and_clean(engine)


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_independent_of_the_batch(tiny_model, tiny_adapters):
    params = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    target = lambda: req(0, "attn4", new=16, rid="target", **params)  # noqa: E731
    alone = solo(make_engine(tiny_model, tiny_adapters), target())
    others = [req(1, new=16, temperature=1.0), req(2, None, "soft", new=10, temperature=1.3, seed=7),
              req(3, "attn4", new=12, temperature=0.7, seed=1234), req(0, new=16),
              req(0, "attn4", new=16, temperature=1.0)]
    engine = make_engine(tiny_model, tiny_adapters)
    d = Driver(engine)
    d.add(others[0])
    d.step()
    d.step()
    d.add(target())  # joins mid-decode
    for r in others[1:]:
        d.add(r)
    d.run()
    assert d.ids["target"] == alone.token_ids
    assert d.text["target"] == alone.text
    assert len(alone.token_ids) == 16 and d.final["target"].finish_reason == "length"


def test_different_seeds_usually_differ(roomy):
    runs = roomy.generate([req(0, new=16, temperature=1.0, seed=s) for s in range(6)])
    distinct = {tuple(r.token_ids) for r in runs}
    assert len(distinct) >= 5
    again = roomy.generate([req(0, new=16, temperature=1.0, seed=s) for s in range(6)])
    assert [r.token_ids for r in again] == [r.token_ids for r in runs]
    greedy_run = roomy.generate([req(0, new=16)])[0]
    assert any(r.token_ids != greedy_run.token_ids for r in runs)


def _pick_stop(text: str, min_start: int = 3) -> tuple[str, int]:
    """A 2-character substring of `text` whose first occurrence starts at or after min_start."""
    for start in range(min_start, len(text) - 1):
        s = text[start:start + 2]
        if "\ufffd" in s or s.strip() == "":
            continue
        if text.find(s) == start:
            return s, start
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("adapter, soft", [(None, None), ("all16", "soft")])
def test_stop_string_cuts_text_and_ids(roomy, adapter, soft):
    base = Request(prompt="the quick brown fox", adapter=adapter, soft_prompt=soft, params=greedy(30))
    [first] = roomy.generate([base])
    assert first.finish_reason == "length"
    stop, at = _pick_stop(first.text)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop, "\x00never\x00"))
    d = Driver(roomy)
    rid = d.add(Request(prompt="the quick brown fox", adapter=adapter, soft_prompt=soft, params=params))
    d.run()
    final = d.final[rid]
    assert final.finish_reason == "stop"
    assert d.text[rid] == first.text[:at]
    ids = d.ids[rid]
    assert ids == first.token_ids[:len(ids)]
    assert len(ids) < len(first.token_ids)
    # the kept ids decode to text before the stop; the next id (part of the stop) was never streamed
    assert stop not in roomy.tokenizer.decode(ids)
    completes = next(k for k in range(len(first.token_ids) + 1) if stop in roomy.tokenizer.decode(first.token_ids[:k]))
    assert len(ids) < completes
    assert_idle_and_clean(roomy)


def test_max_new_tokens_is_length(roomy):
    for n in (1, 2, 7):
        [done] = roomy.generate([req(0, new=n)])
        assert done.finish_reason == "length" and len(done.token_ids) == n


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory, builders) -> Path:
    """The tiny Llama edited so EOS wins early: residual dimension 0 holds a constant 5 (embeddings
    set it, no layer writes it) and only the EOS row of lm_head reads it."""
    from safetensors.torch import load_file, save_file

    out = builders.llama(tmp_path_factory.mktemp("eos-llama"))
    weights = load_file(str(out / "model.safetensors"))
    weights["model.embed_tokens.weight"][:, 0] = 5.0
    for key, value in weights.items():
        if key.endswith(("o_proj.weight", "down_proj.weight")):
            value[0, :] = 0.0
    head = weights["lm_head.weight"]
    head[:, 0] = 0.0
    head[2, 0] = 30.0  # eos id 2
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("prompt", ["the quick brown fox", "SELECT name"])
def test_eos_ends_generation(eos_model, prompt):
    engine = make_engine(eos_model)
    eos = engine.tokenizer.eos_token_id
    assert eos in engine.eos_ids
    [ignored] = engine.generate([Request(prompt=prompt, params=greedy(20))])
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 20
    assert eos in ignored.token_ids, "the edited model should emit EOS within 20 tokens"
    cut = ignored.token_ids.index(eos)
    [stopped] = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=20))])
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == ignored.token_ids[:cut + 1]
    assert ignored.text.startswith(stopped.text)
    assert_idle_and_clean(engine)


# ----------------------------------------------------------------------------- chat


def _template_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "bonjour"}, {"role": "user", "content": "SELECT name"}],
])
def test_chat_messages_go_through_the_template(roomy, messages):
    ids = _template_ids(roomy.tokenizer, messages)
    assert ids[0] == roomy.tokenizer.bos_token_id  # the template's "<s>" is the special token
    chat, by_ids = roomy.generate([
        Request(messages=messages, adapter="attn4", params=greedy(8)),
        Request(prompt_token_ids=ids, adapter="attn4", params=greedy(8)),
    ])
    assert chat.error is None
    assert chat.prompt_tokens == len(ids)
    assert chat.token_ids == by_ids.token_ids
    a, b = roomy.prompt_logits([Request(messages=messages), Request(prompt_token_ids=ids)])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert_idle_and_clean(roomy)


# ----------------------------------------------------------------------------- abort


def test_abort_frees_blocks_and_slots(tiny_model, tiny_adapters, solo_cache):
    engine = make_engine(tiny_model, tiny_adapters, max_running=2, max_loras=2)
    d = Driver(engine)
    running = d.add(req(0, "attn4", new=30, rid="run-attn4"))
    keep = d.add(req(1, "mlp8", new=10, rid="keep-mlp8"))
    waiting = d.add(req(2, "all16", "soft", new=10, rid="wait-all16"))
    for _ in range(100):  # until both adapters' files are read (in the background) and admitted
        d.step()
        if len(engine.scheduler.running) == 2:
            break
    assert {s.request_id for s in engine.scheduler.running} == {running, keep}
    assert [s.request_id for s in engine.scheduler.waiting] == [waiting]
    used = engine.blocks.num_blocks - engine.blocks.num_free
    assert used > 0
    assert engine.abort(running) is True
    assert engine.abort(waiting) is True
    assert engine.abort(running) is False and engine.abort("never-seen") is False
    assert engine.blocks.num_blocks - engine.blocks.num_free < used
    # the freed slot serves another adapter (with two slots and one held by mlp8, a leaked
    # reference on attn4's slot would leave rs2 waiting for ever)
    late = d.add(req(3, "rs2", new=6, rid="late-rs2"))
    engine.slots.read_ahead(["rs2"])  # its files are in host memory before mlp8 can finish
    steps_before = len(d.steps)
    d.run(limit=200)
    after = [o.request_id for s in d.steps[steps_before:] for o in s]
    assert running not in after and waiting not in after
    # rs2 got the freed slot while mlp8 still held the other one
    assert any({late, keep} <= {o.request_id for o in s} for s in d.steps[steps_before:])
    assert d.ids[keep] == solo_cache(req(1, "mlp8", new=10)).token_ids
    assert d.ids[late] == solo_cache(req(3, "rs2", new=6)).token_ids
    assert_idle_and_clean(engine)
    # the aborted ids can be used again
    [done] = engine.generate([req(0, "attn4", new=3, rid="run-attn4")])
    assert done.error is None


def test_abort_everything_returns_all_blocks(roomy):
    ids = [roomy.add_request(req(i, a, s, new=20)) for i, (a, s) in
           enumerate([(None, None), ("attn4", "soft"), ("rs2", None)])]
    for _ in range(3):
        roomy.step()
    assert roomy.blocks.num_free < roomy.blocks.num_blocks
    for rid in ids:
        assert roomy.abort(rid)
    assert roomy.step() == []
    assert_idle_and_clean(roomy)


# ----------------------------------------------------------------------------- streaming


def test_streamed_deltas_add_up_to_the_completion(roomy):
    requests = [req(0, "attn4", new=12), req(1, None, "soft", new=9), Request(prompt="hello world", params=greedy(14))]
    whole = roomy.generate(requests)
    d = Driver(roomy)
    rids = [d.add(r) for r in requests]
    d.run()
    for rid, done in zip(rids, whole):
        assert d.text[rid] == done.text
        assert d.ids[rid] == done.token_ids
        assert d.final[rid].completion_tokens == len(done.token_ids)
        assert d.final[rid].prompt_tokens == done.prompt_tokens
    # every step produced one output per running request, and only the last one is marked finished
    for rid in rids:
        outs = [o for s in d.steps for o in s if o.request_id == rid]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]


def test_streamed_ids_never_include_the_stop_string(roomy):
    prompt = "hello world"
    [first] = roomy.generate([Request(prompt=prompt, adapter="mlp8", params=greedy(30))])
    stop, at = _pick_stop(first.text, min_start=4)
    d = Driver(roomy)
    rid = d.add(Request(prompt=prompt, adapter="mlp8",
                        params=SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop,))))
    streamed: list[int] = []
    text = ""
    while roomy.has_unfinished():
        for out in d.step():
            streamed += out.token_ids
            text += out.text
            # what has been sent so far is final: text before the stop, ids whose text is before it
            assert stop not in text
            assert first.text.startswith(text)
            assert streamed == first.token_ids[:len(streamed)]
            assert stop not in roomy.tokenizer.decode(streamed)
    assert d.final[rid].finish_reason == "stop"
    assert text == first.text[:at]
    assert streamed == d.ids[rid]


# ----------------------------------------------------------------------------- other Llama-family models


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, builders):
    out = {}
    for model_type in ("qwen2", "mistral"):
        root = tmp_path_factory.mktemp(model_type)
        model = builders.llama(root / "model", model_type=model_type)
        lora = builders.lora(model, root / "lora", ATTN + MLP, r=4, alpha=8, seed=11, scale=0.2)
        out[model_type] = (model, lora)
    return out


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_families_match_hf(family_models, reference, model_type):
    from transformers import AutoConfig

    model_dir, lora = family_models[model_type]
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == model_type
    if model_type == "qwen2":  # the point of qwen2 here: biases on q/k/v
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            assert "model.layers.0.self_attn.q_proj.bias" in f.keys()
    engine = make_engine(model_dir, {"lora": lora})
    prompts = [PROMPTS[0], PROMPTS[2]]
    steps = 8
    cases = [(p, a) for p in prompts for a in (None, "lora")]
    results = engine.generate([Request(prompt_token_ids=p, adapter=a, params=greedy(steps)) for p, a in cases])
    refs = []
    for (prompt, adapter), got in zip(cases, results):
        model, _ = reference.load(model_dir, lora if adapter else None)
        ref = reference.greedy(model, prompt, steps)
        refs.append(ref)
        n = reference.comparable(ref, ATOL)
        assert n >= steps // 2, ref.margins
        assert got.token_ids[:n] == ref.tokens[:n], (model_type, adapter)
    forced = [Request(prompt_token_ids=p + ref.tokens, adapter=a) for (p, a), ref in zip(cases, refs)]
    for (prompt, adapter), ref, logits in zip(cases, refs, engine.prompt_logits(forced)):
        torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0,
                                   msg=lambda m: f"{model_type}/{adapter}: {m}")
    # the LoRA really changes this model's output (the comparison above is not base vs base)
    assert not torch.allclose(refs[0].logits, refs[1].logits, atol=1e-2)


# ----------------------------------------------------------------------------- dtypes and quantization

MIXED = [(None, None), ("attn4", None), ("mlp8", None), ("all16", "soft"), ("rs2", None), (None, "soft")]


def _mixed_requests(steps: int) -> list[Request]:
    return [req(i, a, s, new=steps) for i, (a, s) in enumerate(MIXED)]


def test_bfloat16_runs_and_agrees_with_float32_where_margins_are_wide(tiny_model, tiny_adapters, reference):
    """bfloat16 keeps 8 bits of mantissa: its teacher-forced logits are observed up to ~2.1 away
    from float32 here (a soft prompt with a LoRA is the worst), ~0.1-1 at the generated positions.
    So a bfloat16 greedy token must equal float32's only while the float32 top-1/top-2 margin at
    that step exceeds twice the bfloat16 logit error measured (teacher-forced) at that very
    position (the design's near-tie rule with the observed error as the tolerance); tokens are
    compared up to the first step failing it, and at least two requests must get two steps."""
    BF16_ATOL = 3.0
    engine = make_engine(tiny_model, tiny_adapters, dtype="bfloat16")
    assert engine.model.embed.dtype == torch.bfloat16
    steps = 8
    requests = _mixed_requests(steps)
    results = engine.generate(requests)
    compared = []
    for r, got in zip(requests, results):
        assert got.error is None and len(got.token_ids) == steps
        assert all(0 <= t < engine.spec.vocab_size for t in got.token_ids)
        model, soft = reference.load(tiny_model, tiny_adapters.get(r.adapter), tiny_adapters.get(r.soft_prompt))
        ref = reference.greedy(model, r.prompt_token_ids, steps, soft)
        logits = engine.prompt_logits([Request(prompt_token_ids=r.prompt_token_ids + ref.tokens,
                                               adapter=r.adapter, soft_prompt=r.soft_prompt)])[0]
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, ref.logits, atol=BF16_ATOL, rtol=0)
        err = (logits - ref.logits).abs().max(-1).values[len(r.prompt_token_ids) - 1:]  # [steps + 1]
        n = next((t for t in range(steps) if ref.margins[t] <= 2 * float(err[t])), steps)
        assert got.token_ids[:n] == ref.tokens[:n], (r.adapter, r.soft_prompt, ref.margins)
        compared.append(n)
    assert sum(n >= 2 for n in compared) >= 2, f"too few wide-margin steps to compare bfloat16: {compared}"


@pytest.mark.parametrize("quantize", ["int8", "fp4"])
def test_quantized_mixed_lora_batch_runs(tiny_model, tiny_adapters, solo_cache, quantize):
    engine = make_engine(tiny_model, tiny_adapters, quantize=quantize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = engine.generate(_mixed_requests(6))
    for got, float_run in zip(results, [solo_cache(r) for r in _mixed_requests(6)]):
        assert got.error is None and got.finish_reason == "length" and len(got.token_ids) == 6
        assert all(0 <= t < engine.spec.vocab_size for t in got.token_ids)
    # quantization does change the numbers (the float run is a different model)
    assert any(g.token_ids != solo_cache(r).token_ids for g, r in zip(results, _mixed_requests(6)))
    assert_idle_and_clean(engine)


# One request per prefill: the engine builds the same bitsandbytes layers as transformers' int8
# config (threshold 6.0), so its logits match PEFT on the int8 HF model; observed difference 0.0
# (identical bnb kernels on identical int8 weights), asserted within the float32 bound.
INT8_SOLO_ATOL = 1e-4
# In a mixed batch LLM.int8() picks outlier columns (|x| > 6) over the whole batch, so each row's
# result depends on its batch mates; observed up to 0.64 on logits of magnitude ~9.
INT8_BATCH_ATOL = 1.0


@pytest.mark.parametrize("quantize", ["int8", "fp4"])
def test_quantized_logits_match_peft_on_quantized_hf(tiny_model, tiny_adapters, reference, quantize):
    engine = make_engine(tiny_model, tiny_adapters, quantize=quantize)
    steps = 6
    forced, refs = [], []
    for r in _mixed_requests(steps)[:4]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, soft = reference.load(tiny_model, tiny_adapters.get(r.adapter),
                                         tiny_adapters.get(r.soft_prompt), quantize)
            ref = reference.greedy(model, r.prompt_token_ids, steps, soft)
        refs.append(ref)
        forced.append(Request(prompt_token_ids=r.prompt_token_ids + ref.tokens, adapter=r.adapter,
                              soft_prompt=r.soft_prompt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f, ref in zip(forced, refs):
            [alone] = engine.prompt_logits([f])
            torch.testing.assert_close(alone, ref.logits, atol=INT8_SOLO_ATOL, rtol=0,
                                       msg=lambda m: f"{quantize} {f.adapter}/{f.soft_prompt}: {m}")
        together = engine.prompt_logits(forced)
    batch_atol = INT8_BATCH_ATOL if quantize == "int8" else INT8_SOLO_ATOL  # fp4 has no outlier path
    for f, ref, got in zip(forced, refs, together):
        torch.testing.assert_close(got, ref.logits, atol=batch_atol, rtol=0,
                                   msg=lambda m: f"{quantize} batch {f.adapter}/{f.soft_prompt}: {m}")
