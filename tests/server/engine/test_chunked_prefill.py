"""Chunked prefill mixed with decode: a prompt computed over several steps, in steps that also
decode the running sequences, gives the same tokens and logits as its prefill in one piece.

Every expectation is relative: a request on a chunking engine against the same request alone on
a roomy engine (whole-prompt prefill), logits within the float32 bound of the parity tests.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Chunk, Request

ATOL = 1e-4  # float32 logits, absolute (summation order differs between chunk layouts, ~1e-6)
PROMPTS = [
    [5, 17, 42, 99, 7, 11, 3, 250, 64, 33],
    [11, 3, 250, 64, 33, 8, 91, 120, 18, 77],
    [200, 12, 7, 7, 19, 140, 66, 5, 81, 9],
    [44, 10, 9, 81, 5, 66, 140, 19, 7, 7],
]
LONG = PROMPTS[0] + PROMPTS[1]  # 20 tokens
CASES = [(None, None), ("all16", None), (None, "soft"), ("attn4", "soft")]


def make_engine(model_dir, adapters, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    kw.setdefault("max_total_tokens", 2048)
    engine = Engine(EngineConfig(model=str(model_dir), **kw))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return engine


def req(prompt: list[int], rid: str, adapter=None, soft=None, new: int = 8) -> Request:
    return Request(prompt_token_ids=list(prompt), adapter=adapter, soft_prompt=soft, request_id=rid,
                   params=SamplingParams(max_new_tokens=new, ignore_eos=True))


def make_resident(engine: Engine, *names: str) -> None:
    for name in names:
        engine.slots.pin(name)
        engine.slots.unpin(name)


@dataclass(frozen=True)
class Seen:
    """A chunk as it was scheduled (its sequence moves on afterwards)."""

    rid: str
    start: int
    length: int
    samples: bool
    is_decode: bool
    preempted: bool  # its sequence had been preempted before

    @property
    def end(self) -> int:
        return self.start + self.length


class Recorder:
    """Drives `step()` by hand; records each step's chunks, and per request its tokens and the
    logits each of them was sampled from."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps: list[list[Seen]] = []
        self.sampled: list[set[str]] = []  # per step: requests that sampled a token
        self.loads: list[int] = []  # per step: adapters copied into slots so far (after scheduling)
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.tokens: dict[str, list[int]] = defaultdict(list)
        run = engine.runner.run

        def recording(chunks: list[Chunk]):
            self.steps.append([Seen(c.seq.request_id, c.start, c.length, c.samples, c.is_decode,
                                    c.seq.num_preemptions > 0) for c in chunks])
            self.loads.append(engine.slots.loads)
            logits, seqs = run(chunks)
            self.sampled.append({seq.request_id for seq in seqs})
            for seq, row in zip(seqs, logits):
                self.logits[seq.request_id].append(row.clone())
            return logits, seqs

        engine.runner.run = recording

    def add(self, request: Request) -> None:
        self.engine.add_request(request)

    def step(self) -> None:
        for out in self.engine.step():
            assert out.error is None, out.error
            self.tokens[out.request_id] += out.token_ids

    def run(self, limit: int = 500) -> None:
        for _ in range(limit):
            if not self.engine.has_unfinished():
                return
            self.step()
        raise AssertionError(f"engine still busy after {limit} steps")

    def chunks_of(self, rid: str) -> list[tuple[int, Seen]]:
        """(step, chunk) of every chunk `rid` computed."""
        return [(i, c) for i, step in enumerate(self.steps) for c in step if c.rid == rid]


@pytest.fixture(scope="module")
def roomy(tiny_model, tiny_adapters) -> Engine:
    """Solo runs compute every prompt in full: no prefix cache."""
    return make_engine(tiny_model, tiny_adapters, prefix_caching=False)


@pytest.fixture(scope="module")
def solo(roomy):
    """request -> (tokens, logits rows) of that request alone on the roomy engine (one prefill)."""
    cache: dict = {}

    def run(request: Request) -> tuple[list[int], list[torch.Tensor]]:
        key = (tuple(request.prompt_token_ids), request.adapter, request.soft_prompt, request.params.max_new_tokens)
        if key not in cache:
            assert not roomy.has_unfinished()
            run_ = roomy.runner.run
            try:
                rec = Recorder(roomy)
                rec.add(Request(prompt_token_ids=request.prompt_token_ids, adapter=request.adapter,
                                soft_prompt=request.soft_prompt, params=request.params, request_id="solo"))
                rec.run()
            finally:
                roomy.runner.run = run_
            [first] = rec.steps[0]
            assert first.start == 0 and first.samples  # the whole prompt in one step
            cache[key] = (rec.tokens["solo"], rec.logits["solo"])
        return cache[key]

    return run


def assert_matches_solo(rec: Recorder, request: Request, solo) -> None:
    tokens, logits = solo(request)
    rid = request.request_id
    assert rec.tokens[rid] == tokens, rid
    assert len(rec.logits[rid]) == len(logits) == request.params.max_new_tokens
    for step, (got, want) in enumerate(zip(rec.logits[rid], logits)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{rid} token {step}: {m}")


def assert_idle_and_clean(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    assert engine._seqs == {}


# ----------------------------------------------------------------------------- one prompt in pieces


@pytest.fixture(scope="module")
def tiny_budget(tiny_model, tiny_adapters) -> Engine:
    """At most 3 prompt positions per step: the soft prompt's 5 virtual positions span two chunks."""
    return make_engine(tiny_model, tiny_adapters, max_batch_tokens=3)


@pytest.mark.parametrize("adapter, soft", CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_long_prompt_in_chunks_matches_its_solo_run(tiny_budget, solo, adapter, soft):
    request = req(LONG, "long", adapter, soft, new=6)
    rec = Recorder(tiny_budget)
    rec.add(request)
    rec.run()
    positions = len(LONG) + (5 if soft else 0)
    chunks = rec.chunks_of("long")
    prefill = [c for _, c in chunks[:-5]]  # the last 5 chunks are decodes
    assert [(c.start, c.length) for c in prefill] == [(s, min(3, positions - s)) for s in range(0, positions, 3)]
    # no token before the last chunk, then one per step
    assert [bool(s) for s in rec.sampled] == [False] * (len(prefill) - 1) + [True] * 6
    assert_matches_solo(rec, request, solo)
    assert_idle_and_clean(tiny_budget)


def test_mixed_requests_in_chunks_match_their_solo_runs(tiny_model, tiny_adapters, solo):
    engine = make_engine(tiny_model, tiny_adapters, max_batch_tokens=7)
    requests = [req(PROMPTS[i] + PROMPTS[(i + 1) % 4][:i * 3], f"r{i}", a, s, new=6)
                for i, (a, s) in enumerate(CASES)]
    rec = Recorder(engine)
    for r in requests:
        rec.add(r)
    rec.run()
    # chunks started mid-prompt shared steps with other sequences' decodes
    assert any(any(c.start > 0 and not c.is_decode for c in step) and any(c.is_decode for c in step)
               for step in rec.steps)
    for r in requests:
        assert_matches_solo(rec, r, solo)
    assert_idle_and_clean(engine)


# ----------------------------------------------------------------------------- arriving while others decode


def test_request_arriving_mid_decode_is_chunked_and_stalls_no_stream(tiny_model, tiny_adapters, solo):
    engine = make_engine(tiny_model, tiny_adapters, prefill_chunk_tokens=4)
    make_resident(engine, "attn4", "mlp8", "all16")
    early = [req(PROMPTS[0], "early-base", new=20), req(PROMPTS[1], "early-attn4", "attn4", new=20),
             req(PROMPTS[2], "early-soft", None, "soft", new=20)]
    late = [req(LONG, "late-long-mlp8", "mlp8", new=6), req(PROMPTS[3], "late-all16-soft", "all16", "soft", new=6)]
    rec = Recorder(engine)
    for r in early:
        rec.add(r)
    for _ in range(3):  # one prefill (the whole burst in one step), then two decodes
        rec.step()
    assert len(rec.steps[0]) == 3 and all(c.start == 0 and c.samples for c in rec.steps[0])
    first_late_step = len(rec.steps)
    for r in late:
        rec.add(r)
    rec.run()

    early_ids = {r.request_id for r in early}
    admitted = next(i for i, step in enumerate(rec.steps) if any(c.rid.startswith("late") for c in step))
    assert admitted == first_late_step
    assert {c.rid for c in rec.steps[admitted] if c.is_decode} == early_ids
    for r in late:
        prefill = [c for _, c in rec.chunks_of(r.request_id) if not c.is_decode]
        assert len(prefill) > 1 and all(c.length <= 4 for c in prefill), (r.request_id, prefill)
    # while the late prompts are prefilled, no step computes more than 4 prompt positions and
    # every early stream gets its token in every step
    late_prefill_steps = {i for r in late for i, c in rec.chunks_of(r.request_id) if not c.is_decode}
    for i in late_prefill_steps:
        assert sum(c.length for c in rec.steps[i] if not c.is_decode) <= 4
        assert early_ids <= rec.sampled[i], (i, rec.sampled[i])
    for r in early + late:
        assert_matches_solo(rec, r, solo)
    assert engine.scheduler.num_preemptions == 0
    assert_idle_and_clean(engine)


def test_auto_budget_is_the_decoding_rows_plus_a_floor(tiny_model, tiny_adapters, solo):
    """The default (auto) budget while 3 sequences decode: 3 + 16 prompt positions per step."""
    from loraplex.server.engine.scheduler import AUTO_PREFILL_EXTRA_TOKENS

    engine = make_engine(tiny_model, tiny_adapters)
    assert engine.scheduler.prefill_chunk_tokens is None
    make_resident(engine, "attn4")
    early = [req(p, f"early-{i}", new=30) for i, p in enumerate(PROMPTS[:3])]
    late = req(LONG * 3, "late-long", "attn4", new=4)  # 60 prompt positions
    rec = Recorder(engine)
    for r in early:
        rec.add(r)
    rec.step()
    rec.add(late)
    rec.run()
    budget = len(early) + AUTO_PREFILL_EXTRA_TOKENS
    prefill = [c for _, c in rec.chunks_of("late-long") if not c.is_decode]
    assert [c.length for c in prefill] == [budget, budget, budget, 60 - 3 * budget]
    for r in [*early, late]:
        assert_matches_solo(rec, r, solo)
    assert_idle_and_clean(engine)


def test_at_most_one_adapter_copied_per_step_while_decoding(tiny_model, tiny_adapters, solo):
    engine = make_engine(tiny_model, tiny_adapters)
    make_resident(engine, "attn4")
    engine.slots.read_ahead(["mlp8", "all16", "rs2"])  # host-cached, not in a slot
    rec = Recorder(engine)
    rec.add(req(PROMPTS[0], "running", new=10))
    rec.step()
    late = [req(PROMPTS[1], "mlp8", "mlp8", new=4), req(PROMPTS[2], "all16", "all16", new=4),
            req(PROMPTS[3], "attn4", "attn4", new=4), req(PROMPTS[0], "rs2", "rs2", new=4)]
    for r in late:
        rec.add(r)
    loads_before = engine.slots.loads
    rec.run()
    admitted = [sorted(c.rid for c in step if c.start == 0) for step in rec.steps[1:5]]
    # the resident adapter is not held up; the others are copied in one per step, in FIFO order,
    # each starting its prefill in the step after its copy
    assert admitted == [["attn4"], ["mlp8"], ["all16"], ["rs2"]]
    assert [n - loads_before for n in rec.loads[1:5]] == [1, 2, 3, 3]
    for r in late:
        assert_matches_solo(rec, r, solo)
    assert_idle_and_clean(engine)


def test_without_decodes_a_burst_copies_every_adapter_in_one_step(tiny_model, tiny_adapters):
    engine = make_engine(tiny_model, tiny_adapters)
    engine.slots.read_ahead(["mlp8", "all16", "rs2"])
    rec = Recorder(engine)
    for name in ("mlp8", "all16", "rs2"):
        rec.add(req(PROMPTS[0], name, name, new=2))
    rec.run()
    assert len(rec.steps[0]) == 3 and engine.slots.loads == 3 and rec.loads[0] == 3


# ----------------------------------------------------------------------------- preemption


def test_preemption_with_chunked_prefill_recomputes_correctly(tiny_model, tiny_adapters, solo):
    # 16 blocks of 4 = 64 KV positions for six requests needing 22-27 each; at most 6 prompt positions
    # per step, 3 while others decode: prefills and their recomputations run in chunks
    engine = make_engine(tiny_model, tiny_adapters, max_total_tokens=64, max_batch_tokens=6, prefill_chunk_tokens=3)
    mix = [(None, None), ("attn4", None), ("mlp8", None), ("rs2", None), (None, "soft"), ("all16", "soft")]
    make_resident(engine, "attn4", "mlp8", "rs2", "all16")
    requests = [req(PROMPTS[i % 4], f"p{i}", a, s, new=12) for i, (a, s) in enumerate(mix)]
    rec = Recorder(engine)
    for r in requests:
        rec.add(r)
    rec.run()

    assert engine.scheduler.num_preemptions > 0
    # a preempted sequence's recomputation (prompt and generated tokens) itself ran in chunks
    assert [c for step in rec.steps for c in step if c.preempted and c.start > 0 and not c.is_decode]
    for r in requests:
        assert_matches_solo(rec, r, solo)
    assert_idle_and_clean(engine)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["recomputed", "cached"])
def test_sequence_preempted_part_way_through_its_prefill_starts_over(tiny_model, tiny_adapters, solo, prefix_caching):
    """Without the prefix cache it starts again from position 0; with it, from the prompt blocks
    it had completed (they stay cached after it frees them, unless their memory was needed)."""
    # 16 blocks of 4. The decoding request holds 3 blocks and grows; the late one (5 virtual + 40
    # prompt positions) takes 12 at admission and is prefilled 2 positions per step, so the
    # decoding one runs out of blocks while the late one is still part-way through its prompt
    engine = make_engine(tiny_model, tiny_adapters, max_total_tokens=64, max_batch_tokens=6, prefill_chunk_tokens=2,
                         prefix_caching=prefix_caching)
    make_resident(engine, "attn4", "all16")
    decoding = req(PROMPTS[2], "decoding", "attn4", new=30)
    late = req(LONG + LONG, "late", "all16", "soft", new=4)
    rec = Recorder(engine)
    computed_when_preempted = []
    preempt = engine.scheduler._preempt

    def recording_preempt(seq):
        computed_when_preempted.append((seq.request_id, seq.num_computed, seq.num_tokens))
        preempt(seq)

    engine.scheduler._preempt = recording_preempt
    rec.add(decoding)
    rec.step()
    rec.add(late)
    rec.run()

    [(rid, computed, positions)] = computed_when_preempted
    assert rid == "late" and 0 < computed < positions - 1
    late_chunks = [c for _, c in rec.chunks_of("late")]
    restarts = [c.start for c in late_chunks if c.preempted][:1]
    if prefix_caching:  # resumed from a block boundary it had reached, not from 0
        assert restarts and 0 < restarts[0] <= computed and restarts[0] % engine.blocks.block_size == 0, restarts
    else:
        assert restarts == [0]
    for r in (decoding, late):
        assert_matches_solo(rec, r, solo)
    assert_idle_and_clean(engine)


# ----------------------------------------------------------------------------- configuration


def test_prefill_chunk_tokens_flag_and_validation():
    import argparse

    from loraplex.server.engine.cli_args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config(parser.parse_args([])).prefill_chunk_tokens is None  # auto
    assert engine_config(parser.parse_args(["--prefill-chunk-tokens", "auto"])).prefill_chunk_tokens is None
    assert engine_config(parser.parse_args(["--prefill-chunk-tokens", "32"])).prefill_chunk_tokens == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefill-chunk-tokens", "lots"])
    with pytest.raises(ValueError, match="prefill_chunk_tokens must be at least 1, got 0"):
        EngineConfig(prefill_chunk_tokens=0).validate()
    assert EngineConfig(device="cpu").chunk_tokens() is None  # the scheduler's auto budget
    assert EngineConfig(device="cpu", prefill_chunk_tokens=32).chunk_tokens() == 32
    assert EngineConfig(device="cuda").chunk_tokens() == 256
