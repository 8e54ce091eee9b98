"""The engine against Hugging Face `peft`: one mixed batch, each request checked against PEFT alone."""
from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

ATOL = 1e-4  # float32, absolute, on logits (the bound)
# On SmolLM2's 30 layers float32 itself is the limit: against a float64 run of the same PEFT
# model, PEFT's float32 logits are off by up to 1.4e-4 on the CI machines' Xeons (4-6e-5 where
# this was first measured), and oneDNN's prepacked matmuls (the CPU default, quantize.py) by
# 5-14e-5. Two float32 summation orders (a 9-request mixed batch against PEFT's one sequence)
# so differ by up to ~2e-4 (relative 3e-5) on either path: the 30-layer tests take 3e-4; the
# tiny model keeps the 1e-4.
ATOL_30_LAYERS = 3e-4
STEPS = 8

# (adapter, soft prompt) per request; several prompts each so adapters span several rows
CASES = [
    (None, None),
    ("attn4", None),
    ("mlp8", None),
    ("all16", None),
    ("rs2", None),
    (None, "soft"),
    ("attn4", "soft"),
    ("all16", None),
    (None, None),
]
PROMPTS = [
    [5, 17, 42, 99, 7],
    [11, 3, 250, 64, 33, 8, 91],
    [200, 12],
    [7, 7, 7, 19, 140, 66, 2 + 3, 81, 9, 10, 44],
]


def _engine(model_dir, adapters, **kw) -> Engine:
    engine = Engine(EngineConfig(model=str(model_dir), max_total_tokens=2048, block_size=4, **kw))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return engine


def _requests(prompts: list[list[int]], cases=CASES, steps: int = STEPS) -> list[Request]:
    return [
        Request(prompt_token_ids=prompts[i % len(prompts)], adapter=a, soft_prompt=s, request_id=f"req-{i}",
                params=SamplingParams(max_new_tokens=steps, ignore_eos=True))
        for i, (a, s) in enumerate(cases)
    ]


def _check_parity(engine: Engine, model_dir, adapters, reference, quantize=None, atol=ATOL, prompts=PROMPTS,
                  merge=True):
    """Greedy tokens equal and teacher-forced logits within `atol` of PEFT, request by request
    (`merge`: how the soft prompt + LoRA reference is built, see `load_reference`)."""
    requests = _requests(prompts)
    decode_logits: list[tuple[list, torch.Tensor]] = []  # (sequences, logits) per step
    run = engine.runner.run

    def recording_run(chunks):
        logits, ordered = run(chunks)
        decode_logits.append((list(ordered), logits))
        return logits, ordered

    engine.runner.run = recording_run
    try:
        results = engine.generate(requests)
    finally:
        engine.runner.run = run
    assert all(r.error is None for r in results), [r.error for r in results]
    # every request ran in the same steps: one prefill then STEPS - 1 decodes, all together
    assert len(decode_logits) == STEPS and all(len(s) == len(requests) for s, _ in decode_logits)

    refs = []
    for req, result in zip(requests, results):
        model, soft_vectors = reference.load(
            model_dir, adapters.get(req.adapter), adapters.get(req.soft_prompt), quantize, merge)
        ref = reference.greedy(model, req.prompt_token_ids, STEPS, soft_vectors)
        refs.append(ref)
        n = reference.comparable(ref, atol)
        assert n >= STEPS // 2, f"reference margins too small to test {req.adapter}/{req.soft_prompt}: {ref.margins}"
        assert result.token_ids[:n] == ref.tokens[:n], (req.adapter, req.soft_prompt)

    # teacher forcing: the reference's sequences, all in one mixed prefill
    forced = [Request(prompt_token_ids=r.prompt_token_ids + ref.tokens, adapter=r.adapter, soft_prompt=r.soft_prompt)
              for r, ref in zip(requests, refs)]
    base_logits = engine.prompt_logits([Request(prompt_token_ids=r.prompt_token_ids) for r in forced])
    for req, ref, got, base in zip(forced, refs, engine.prompt_logits(forced), base_logits):
        torch.testing.assert_close(got, ref.logits, atol=atol, rtol=0, msg=lambda m: f"{req.adapter}/{req.soft_prompt}: {m}")
        if req.adapter or req.soft_prompt:  # the adapters matter, so applying the wrong one would show
            assert (got - base).abs().max() > 1.0, (req.adapter, req.soft_prompt)

    # the decode steps' logits, where the engine's tokens still follow the reference's
    for step, (seqs, logits) in enumerate(decode_logits):
        for seq, row in zip(seqs, logits):
            i = int(seq.request_id.removeprefix("req-"))
            ref, req = refs[i], requests[i]
            if step >= reference.comparable(ref, atol):
                continue
            position = len(req.prompt_token_ids) + step - 1
            torch.testing.assert_close(row, ref.logits[position], atol=atol, rtol=0)


# The mixed-batch tests run every request in one batch; the first and last request share a prompt
# and the base model, and with the prefix cache the last would wait a step for the first's blocks
# (test_prefix_cache.py checks the cache against an engine without it).
def test_mixed_batch_matches_peft_float32(tiny_model, tiny_adapters, reference):
    engine = _engine(tiny_model, tiny_adapters, prefix_caching=False)
    _check_parity(engine, tiny_model, tiny_adapters, reference)
    assert engine.scheduler.num_preemptions == 0


def test_mixed_batch_matches_peft_nf4(tiny_model, tiny_adapters, reference):
    engine = _engine(tiny_model, tiny_adapters, quantize="nf4", prefix_caching=False)
    _check_parity(engine, tiny_model, tiny_adapters, reference, quantize="nf4")


@pytest.mark.slow
@pytest.mark.parametrize("cpu_matmul, atol", [("torch", ATOL_30_LAYERS), ("onednn", ATOL_30_LAYERS)])
def test_default_smollm2_matches_peft(tmp_path_factory, builders, reference, cpu_matmul, atol):
    """The same parity on the default model (SmolLM2-135M-Instruct, 30 layers, tied embeddings),
    with F.linear (PEFT's own arithmetic) and with oneDNN (the default), at the bound float32
    allows on 30 layers (ATOL_30_LAYERS)."""
    from loraplex.server.engine.loader import resolve_model

    model_dir = resolve_model(None)
    adapters = builders.parity_adapters(model_dir, tmp_path_factory.mktemp("smol-adapters"))
    engine = Engine(EngineConfig(max_total_tokens=4096, cpu_matmul=cpu_matmul))
    assert engine.prepacked == (cpu_matmul == "onednn")
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a fox",
             "List three colours: red,"]
    prompts = [engine.tokenizer(t)["input_ids"] for t in texts]
    # soft prompt + LoRA: PEFT's LoRA model fed the soft vectors (merging alone costs ~7e-5 here)
    _check_parity(engine, model_dir, adapters, reference, prompts=prompts, merge=False, atol=atol)
