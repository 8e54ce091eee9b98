"""The decode batch's LoRA grouping is reused across steps, and never once the adapters change."""
from __future__ import annotations

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

PROMPT = [5, 17, 42, 99, 7]


def _engine(tiny_model, adapters, **kw) -> Engine:
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=1024, **kw))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return engine


def _mixed(names):
    return [Request(prompt_token_ids=PROMPT[: 3 + i % 3], adapter=n, request_id=f"r{i}",
                    params=SamplingParams(max_new_tokens=6, ignore_eos=True)) for i, n in enumerate(names)]


def test_reused_layout_gives_the_same_tokens_as_a_fresh_one_each_step(tiny_model, tiny_adapters):
    names = ["attn4", "mlp8", "all16", "rs2", None, "attn4"]
    loras = {n: tiny_adapters[n] for n in ("attn4", "mlp8", "all16", "rs2")}
    reused = _engine(tiny_model, loras).generate(_mixed(names))
    fresh_engine = _engine(tiny_model, loras)
    build = fresh_engine.runner._decode_lora_batch

    def always_fresh(seq_slots):
        fresh_engine.runner._decode_lora = None
        return build(seq_slots)

    fresh_engine.runner._decode_lora_batch = always_fresh
    fresh = fresh_engine.generate(_mixed(names))
    assert [r.token_ids for r in reused] == [f.token_ids for f in fresh]


def test_replacing_an_adapter_between_runs_serves_the_new_weights(tiny_model, tiny_adapters):
    engine = _engine(tiny_model, {"x": tiny_adapters["attn4"]}, max_loras=1)
    before = engine.generate(_mixed(["x", "x"]))
    engine.unregister_adapter("x")
    engine.register_adapter("x", str(tiny_adapters["all16"]))  # same name, same slot, other weights
    after = engine.generate(_mixed(["x", "x"]))
    fresh = _engine(tiny_model, {"x": tiny_adapters["all16"]}, max_loras=1).generate(_mixed(["x", "x"]))
    assert [a.token_ids for a in after] == [f.token_ids for f in fresh]
    assert [a.token_ids for a in after] != [b.token_ids for b in before]
