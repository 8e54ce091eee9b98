"""Serving an adapter from merged weights (static and dynamic) agrees with unmerged serving;
`loraplex merge` exports what PEFT's merge_and_unload() gives."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.export import export_merged
from loraplex.server.engine.merging import MergePolicy, merge_mode
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

PROMPTS = [[5, 17, 42, 99, 7], [11, 3, 250, 64, 33, 8, 91], [200, 12]]
LORAS = ("attn4", "mlp8", "all16", "rs2")
# batch make-ups that make the runner take each way of serving the rest of the batch
MAKEUPS = {
    "merged": ["all16"] * 4,
    "split": ["all16"] * 3 + ["attn4", "mlp8", None],
    "correct": ["all16"] * 8 + ["rs2"],
}
# absolute logit tolerances: float32 as the parity tests; float16 rounds the merged weights
# W + scale·B·A to half precision once (up to ~0.05 on logits of magnitude ~10 observed)
ATOL = {"float32": 1e-4, "float16": 0.1}


def _engine(tiny_model, tiny_adapters, **kw) -> Engine:
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=2048, **kw))
    for name in LORAS + ("soft",):
        engine.register_adapter(name, str(tiny_adapters[name]))
    return engine


def _requests(names, steps=6, soft_on=()):
    return [Request(prompt_token_ids=PROMPTS[i % 3], adapter=n, soft_prompt="soft" if i in soft_on else None,
                    params=SamplingParams(max_new_tokens=steps, ignore_eos=True)) for i, n in enumerate(names)]


def _compare(unmerged: Engine, merged: Engine, names, atol: float, soft_on=()) -> None:
    """Tokens equal up to the first near-tie of the unmerged run; teacher-forced logits within atol."""
    expected = unmerged.generate(_requests(names, soft_on=soft_on))
    got = merged.generate(_requests(names, soft_on=soft_on))
    forced = [Request(prompt_token_ids=r.prompt_token_ids + e.token_ids, adapter=r.adapter, soft_prompt=r.soft_prompt)
              for r, e in zip(_requests(names, soft_on=soft_on), expected)]
    ref_logits = unmerged.prompt_logits(forced)
    got_logits = merged.prompt_logits(forced)
    compared = 0
    for req, e, g, ref, logits in zip(forced, expected, got, ref_logits, got_logits):
        torch.testing.assert_close(logits, ref, atol=atol, rtol=0)
        prompt = len(req.prompt_token_ids) - len(e.token_ids)
        top2 = torch.topk(ref[prompt - 1 : -1], 2).values
        near = (top2[:, 0] - top2[:, 1] < atol).nonzero()  # DESIGN.md: margins below the tolerance
        n = int(near[0]) if len(near) else len(e.token_ids)
        assert g.token_ids[:n] == e.token_ids[:n], req.adapter
        compared += n
    # near-ties may end the comparison early for a request, never for most tokens
    assert compared >= 0.5 * sum(len(e.token_ids) for e in expected), compared


def test_merge_mode_picks_the_cheaper_way():
    assert merge_mode(0, 5, 16, False) is None
    assert merge_mode(5, 0, 16, False) == "merged"
    assert merge_mode(9, 1, 4, False) == "correct"  # 1·4 < 10
    assert merge_mode(9, 1, 16, False) == "split"  # 1·16 >= 10
    assert merge_mode(9, 1, 4, True) == "split"  # a quantized base never mixes kernels for the others


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_static_merge_agrees_with_unmerged_serving(tiny_model, tiny_adapters, dtype):
    unmerged = _engine(tiny_model, tiny_adapters, dtype=dtype)
    merged = _engine(tiny_model, tiny_adapters, dtype=dtype)
    merged.merge_adapter("all16", static=True)
    base = merged.model.layers[0].proj["qkv_proj"].base.dense().clone()
    for mode, names in MAKEUPS.items():
        merged.prompt_logits(_requests(names))
        assert merged.merger.last_mode == mode, (mode, merged.merger.last_mode)
        _compare(unmerged, merged, names, ATOL[dtype], soft_on=(1,))
    assert torch.equal(merged.model.layers[0].proj["qkv_proj"].base.dense(), base)  # the base is never modified
    assert merged.merger.switches == 1


def test_merge_on_a_quantized_base_keeps_a_dense_copy(tiny_model, tiny_adapters):
    unmerged = _engine(tiny_model, tiny_adapters, quantize="nf4")
    merged = _engine(tiny_model, tiny_adapters, quantize="nf4")
    merged.merge_adapter("all16", static=True)
    layer = merged.model.layers[0].proj["gate_up_proj"]
    assert layer.merged.weight.dtype == torch.float32 and layer.merged.weight.shape == (256, 64)
    for names in MAKEUPS.values():
        _compare(unmerged, merged, names, 1e-4)


def test_unmerge_restores_base_serving_and_unregistering_unmerges(tiny_model, tiny_adapters):
    unmerged = _engine(tiny_model, tiny_adapters)
    engine = _engine(tiny_model, tiny_adapters)
    engine.merge_adapter("attn4")
    assert "attn4" in engine.slots.pinned and engine.model.layers[1].proj["o_proj"].merged is not None
    assert engine.model.layers[1].proj["gate_up_proj"].merged is None  # attn4 leaves the MLP alone
    engine.unmerge_adapter()
    assert "attn4" not in engine.slots.pinned
    assert all(layer.merged is None for layer in engine.model.lora_layers())
    _compare(unmerged, engine, MAKEUPS["split"], 1e-4)
    engine.merge_adapter("mlp8", static=True)
    engine.unregister_adapter("mlp8")
    assert engine.merger.merged is None and engine.merger.policy.static is None


def test_policy_merges_after_patience_and_does_not_flap():
    policy = MergePolicy(dynamic=True, high=0.75, low=0.5, patience=3, min_running=4)
    dominated = ["a"] * 7 + ["b"]
    assert [policy.decide(None, dominated) for _ in range(2)] == [None, None]
    assert policy.decide(None, dominated) == "a"
    # shares between low and high keep the current state either way
    between = ["a"] * 5 + ["b", "c", None]
    assert all(policy.decide("a", between) == "a" for _ in range(10))
    assert all(policy.decide(None, between) is None for _ in range(10))
    # a dip below low that does not last is ignored
    mixed = ["a", "b", "c", "d"]
    assert [policy.decide("a", mixed), policy.decide("a", mixed), policy.decide("a", dominated)] == ["a", "a", "a"]
    assert [policy.decide("a", mixed) for _ in range(3)] == ["a", "a", None]
    assert policy.decide(None, ["a", "a"]) is None  # too few running to merge
    assert MergePolicy(static="s").decide(None, mixed) == "s"


def test_dynamic_merge_switches_with_traffic_and_agrees(tiny_model, tiny_adapters):
    unmerged = _engine(tiny_model, tiny_adapters)
    engine = _engine(tiny_model, tiny_adapters, dynamic_merge=True, merge_patience=2)
    names = ["all16"] * 7 + ["rs2"]
    _compare(unmerged, engine, names, 1e-4)
    assert engine.merger.merged == "all16" and engine.merger.switches == 1
    _compare(unmerged, engine, ["attn4", "mlp8", "rs2", None] * 2, 1e-4)  # traffic mixes again
    assert engine.merger.merged is None and engine.merger.switches == 2


def test_exported_model_equals_peft_merge_and_unload(tmp_path, tiny_model, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_merged(str(tiny_model), str(tiny_adapters["all16"]), str(tmp_path / "merged"))
    standalone = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                          tiny_adapters["all16"]).merge_and_unload().eval()
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(standalone(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
        assert standalone.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
            reference.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    assert json.loads((out / "loraplex_merge.json").read_text())["adapter"] == str(tiny_adapters["all16"])


def test_merge_and_generate_commands(tmp_path, tiny_model, tiny_adapters):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "loraplex.clients.cli", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    lines = [{"prompt": "hello world", "adapter": "all16", "max_new_tokens": 5, "ignore_eos": True},
             {"prompt": "the quick brown fox", "adapter": "attn4", "max_new_tokens": 5, "ignore_eos": True},
             {"prompt": "SELECT name", "max_new_tokens": 5, "ignore_eos": True}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    common = ["generate", "--model", tiny_model, "--input", "in.jsonl", "--json",
              "--adapter", f"all16={tiny_adapters['all16']}", "--adapter", f"attn4={tiny_adapters['attn4']}"]
    plain, merged = cli(*common), cli(*common, "--merge", "all16")
    assert plain.returncode == 0 and merged.returncode == 0, merged.stderr
    assert merged.stdout == plain.stdout
    refused = cli(*common, "--merge", "nope")
    assert refused.returncode == 2 and "--merge nope" in refused.stderr
    done = cli("merge", "--model", tiny_model, "--adapter", tiny_adapters["attn4"], "--out", tmp_path / "out")
    assert done.returncode == 0 and (tmp_path / "out" / "model.safetensors").is_file(), done.stderr
    again = cli("merge", "--model", tiny_model, "--adapter", tiny_adapters["attn4"], "--out", tmp_path / "out")
    assert again.returncode == 2 and "not empty" in again.stderr
