"""The prefix cache: prompts that begin alike reuse computed KV blocks, only under the same adapter
and soft prompt registration, with the same tokens and logits as computing them in full.

Each test checks an engine with the cache against one without it (`plain`), on the same requests."""
from __future__ import annotations

import shutil

import pytest
import torch

from loraplex.server.engine.block_manager import BlockManager, prefix_hashes
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

BLOCK = 4
SHARED = [(11 * i + 5) % 290 + 3 for i in range(18)]  # 4 full blocks and 2 positions in common
TAILS = [[40, 41, 42, 43, 44], [90, 91, 92], [7, 8, 9, 10, 11, 12, 13]]
ATOL = 1e-4  # float32, the same positions computed in different batch shapes


def make(model, adapters, caching: bool, **kw) -> Engine:
    engine = Engine(EngineConfig(model=str(model), block_size=BLOCK, max_total_tokens=kw.pop("max_total_tokens", 1024),
                                 prefix_caching=caching, **kw))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return engine


def first_chunk_starts(engine: Engine, requests: list[Request]) -> tuple[list[int], list]:
    """Run `requests` one after another; -> (where each one's first chunk started, completions)."""
    starts, done = [], []
    real = engine.runner.run

    def run(chunks):
        for c in chunks:
            if c.seq.request_id not in seen:
                seen.add(c.seq.request_id)
                starts.append(c.start)
        return real(chunks)

    seen: set[str] = set()
    engine.runner.run = run
    try:
        for r in requests:
            done += engine.generate([r])
    finally:
        engine.runner.run = real
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    return starts, done


def req(prompt, rid, adapter=None, soft=None, new=6) -> Request:
    return Request(prompt_token_ids=list(prompt), adapter=adapter, soft_prompt=soft, request_id=rid,
                   params=SamplingParams(max_new_tokens=new, ignore_eos=True))


@pytest.fixture(scope="module")
def engines(tiny_model, tiny_adapters):
    return make(tiny_model, tiny_adapters, True), make(tiny_model, tiny_adapters, False)


def assert_same_results(cached, plain, requests):
    """Tokens equal to the engine without the cache (the logits test below compares logits)."""
    for r, got, want in zip(requests, cached, plain):
        assert got.error is None and got.token_ids == want.token_ids, r.request_id


@pytest.mark.parametrize("adapter, soft", [(None, None), ("attn4", None), (None, "soft"), ("all16", "soft")])
def test_prompts_that_begin_alike_start_after_their_common_full_blocks(engines, adapter, soft):
    cached, plain = engines
    tag = f"{adapter}-{soft}"
    requests = [req(SHARED + tail, f"{tag}-{i}", adapter, soft) for i, tail in enumerate(TAILS)]
    starts, got = first_chunk_starts(cached, requests)
    virtual = 5 if soft else 0  # the tiny soft prompt's virtual positions come first
    common = (virtual + len(SHARED)) // BLOCK * BLOCK
    assert starts[0] == 0 and starts[1:] == [common, common], starts
    _, want = first_chunk_starts(plain, requests)
    assert_same_results(got, want, requests)


def test_a_prompt_seen_before_recomputes_only_its_last_position(engines):
    cached, plain = engines
    prompt = [p + 1 for p in SHARED[:16]]  # exactly 4 blocks: 3 reusable, the 4th holds the last position
    requests = [req(prompt, "again-0"), req(prompt, "again-1")]
    starts, got = first_chunk_starts(cached, requests)
    assert starts == [0, 12]
    _, want = first_chunk_starts(plain, requests)
    assert_same_results(got, want, requests)


def test_prompt_logits_after_a_cached_prefix_match_a_full_prefill(engines):
    cached, plain = engines
    prompt = SHARED + TAILS[2]
    first_chunk_starts(cached, [req(SHARED + TAILS[0], "warm")])
    logits = {}
    for name, engine in (("cached", cached), ("plain", plain)):
        rows = []
        real = engine.runner.run

        def run(chunks, real=real, rows=rows):
            out, seqs = real(chunks)
            rows.append(out[0].clone())
            return out, seqs

        engine.runner.run = run
        try:
            engine.generate([req(prompt, f"logits-{name}", new=3)])
        finally:
            engine.runner.run = real
        logits[name] = torch.stack(rows)
    torch.testing.assert_close(logits["cached"], logits["plain"], atol=ATOL, rtol=0)


def test_a_burst_sharing_a_prefix_computes_it_once(tiny_model, tiny_adapters):
    """Requests sent together: the first computes the common prefix, the others wait for its
    blocks instead of computing them beside it."""
    cached = make(tiny_model, tiny_adapters, True)
    plain = make(tiny_model, tiny_adapters, False)
    burst = [req([p + 2 for p in SHARED] + tail, f"burst-{i}", "attn4") for i, tail in enumerate(TAILS)]
    starts = []
    real = cached.runner.run

    def run(chunks):
        starts.extend((c.seq.request_id, c.start) for c in chunks if not c.is_decode)
        return real(chunks)

    cached.runner.run = run
    got = cached.generate(burst)
    cached.runner.run = real
    common = len(SHARED) // BLOCK * BLOCK
    assert sorted(starts) == [("burst-0", 0), ("burst-1", common), ("burst-2", common)], starts
    assert_same_results(got, plain.generate(burst), burst)
    assert cached.blocks.num_free == cached.blocks.num_blocks


def test_no_reuse_across_adapters_soft_prompts_or_the_base(tiny_model, tiny_adapters):
    cached = make(tiny_model, tiny_adapters, True)  # fresh: a soft prompt's all-virtual first block is shared
    variants = [(None, None), ("attn4", None), ("mlp8", None), (None, "soft"), ("attn4", "soft")]
    prompt = [250, 251, 252, 253, 254, 255, 256, 257, 258, 259, 260]
    starts, _ = first_chunk_starts(cached, [req(prompt, f"v{i}", a, s) for i, (a, s) in enumerate(variants)])
    assert starts == [0] * len(variants)


def test_a_re_registered_adapter_does_not_reuse_the_old_ones_blocks(tiny_model, tiny_adapters, tmp_path):
    """Same name, new weights: its blocks were computed with the old weights."""
    path = tmp_path / "task"
    shutil.copytree(tiny_adapters["attn4"], path)
    engine = make(tiny_model, {"task": path}, True)
    first_chunk_starts(engine, [req(SHARED, "old", "task")])
    shutil.rmtree(path)
    shutil.copytree(tiny_adapters["all16"], path)
    engine.register_adapter("task", str(path))
    starts, got = first_chunk_starts(engine, [req(SHARED, "new", "task")])
    assert starts == [0]
    plain = make(tiny_model, {"task": path}, False)
    _, want = first_chunk_starts(plain, [req(SHARED, "new", "task")])
    assert got[0].token_ids == want[0].token_ids


def test_cached_blocks_give_way_when_memory_is_needed(tiny_model, tiny_adapters):
    """A cache of 24 blocks and prompts of 7 blocks each: freed prompts stay cached only until
    their blocks are needed; every result equals the engine without the cache; nothing leaks."""
    prompts = [[(13 * i + 7 * j) % 280 + 10 for j in range(26)] for i in range(6)]
    requests = [req(p, f"evict-{i}", new=4) for i, p in enumerate(prompts + prompts[:2])]
    cached = make(tiny_model, tiny_adapters, True, max_total_tokens=24 * BLOCK)
    starts, got = first_chunk_starts(cached, requests)
    assert starts[:6] == [0] * 6
    assert starts[6:] == [0, 0]  # the first two prompts' blocks were taken by the later ones
    _, want = first_chunk_starts(make(tiny_model, tiny_adapters, False, max_total_tokens=24 * BLOCK), requests)
    assert_same_results(got, want, requests)


# ----------------------------------------------------------------------------- the block manager alone


def test_prefix_hashes_cover_the_whole_prefix_and_the_key():
    ids = list(range(40))
    a = prefix_hashes(ids, 4, 5, "x#1|")
    assert len(a) == 5 and len(set(a)) == 5
    assert prefix_hashes(ids[:20] + [99] * 20, 4, 5, "x#1|") == a  # only the first 5 blocks count
    assert prefix_hashes([1] + ids[1:], 4, 5, "x#1|")[4] != a[4]  # an early token changes every later hash
    assert prefix_hashes(ids, 4, 5, "x#2|") != a
    assert prefix_hashes(ids, 4, 0, "x#1|") == []


def test_cached_blocks_are_found_held_and_evicted_oldest_first():
    blocks = BlockManager(num_blocks=6, block_size=4)
    hashes = prefix_hashes(list(range(12)), 4, 3, "")
    first: list[int] = []
    blocks.allocate(first, 12)
    for block, h in zip(first, hashes):
        blocks.register(block, h)
    assert blocks.cached_count(hashes) == (3, 0)
    blocks.free(first)
    assert blocks.num_free == 6 and blocks.cached_count(hashes) == (3, 3)
    again = blocks.cached_prefix(hashes[:2])
    assert blocks.cached_count(hashes) == (3, 1) and blocks.num_free == 4
    other: list[int] = []
    blocks.allocate(other, 16)  # 3 never-cached blocks, then the idle cached one (the third)
    assert blocks.cached_count(hashes) == (2, 0)
    assert not set(other) & set(again)
    blocks.free(other)
    blocks.free(again)
    assert blocks.num_free == 6 and blocks.cached_count(hashes) == (2, 2)


def test_a_soft_prompts_virtual_blocks_are_shared_by_different_prompts(tiny_model, tiny_adapters):
    """Blocks made only of a soft prompt's virtual positions are the same whatever follows."""
    cached = make(tiny_model, tiny_adapters, True)
    starts, _ = first_chunk_starts(cached, [req([30 + i for i in range(9)], "s0", soft="soft"),
                                            req([200 + i for i in range(9)], "s1", soft="soft")])
    assert starts == [0, 4]  # 5 virtual positions: one full block of them
