"""Per-token adapter weights gathered once and reused across decode steps, never stale."""
from __future__ import annotations

import torch

from loraplex.kernels import GatherCache
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

PROMPT = [5, 17, 42, 99, 7]


def test_cache_reuses_a_gather_within_its_budget():
    pool = torch.randn(6, 4, 8)
    other = torch.randn(6, 4, 8)
    index = torch.tensor([3, 0, 3])
    cache = GatherCache(budget_bytes=pool[index].nbytes)
    first = cache.gather(pool, index)
    assert torch.equal(first, pool[index])
    assert cache.gather(pool, index) is first  # reused, not gathered again
    assert cache.used_bytes == first.nbytes
    beyond = cache.gather(other, index)  # over budget: correct, just not kept
    assert torch.equal(beyond, other[index])
    assert cache.gather(other, index) is not beyond
    assert cache.used_bytes == first.nbytes


def _engine(tiny_model, adapters, **kw) -> Engine:
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=1024, **kw))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return engine


def _mixed(names):
    return [Request(prompt_token_ids=PROMPT[: 3 + i % 3], adapter=n, request_id=f"r{i}",
                    params=SamplingParams(max_new_tokens=6, ignore_eos=True)) for i, n in enumerate(names)]


def test_decode_results_do_not_depend_on_the_cache(tiny_model, tiny_adapters):
    names = ["attn4", "mlp8", "all16", "rs2", None, "attn4"]
    loras = {n: tiny_adapters[n] for n in ("attn4", "mlp8", "all16", "rs2")}
    cached = _engine(tiny_model, loras).generate(_mixed(names))
    uncached = _engine(tiny_model, loras, gather_cache_mb=0).generate(_mixed(names))
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached]


def test_replacing_an_adapter_between_runs_serves_the_new_weights(tiny_model, tiny_adapters):
    engine = _engine(tiny_model, {"x": tiny_adapters["attn4"]}, max_loras=1)
    before = engine.generate(_mixed(["x", "x"]))
    engine.unregister_adapter("x")
    engine.register_adapter("x", str(tiny_adapters["all16"]))  # same name, same slot, other weights
    after = engine.generate(_mixed(["x", "x"]))
    fresh = _engine(tiny_model, {"x": tiny_adapters["all16"]}, max_loras=1).generate(_mixed(["x", "x"]))
    assert [a.token_ids for a in after] == [f.token_ids for f in fresh]
    assert [a.token_ids for a in after] != [b.token_ids for b in before]
