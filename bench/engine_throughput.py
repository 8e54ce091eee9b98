"""Decode throughput with many distinct adapters in one batch, against the peers that run here.

Contenders, all in this one process, float32, the same thread count, the same prompts, every
request generating exactly `new_tokens` tokens:
- loraplex, base model only, and with one distinct LoRA adapter per request;
- Hugging Face `generate`, base model only (left-padded batch);
- PEFT `generate(adapter_names=...)` with the same adapters (its mixed-adapter batch);
- the machine's ceiling: the bare matrix multiplies of one decode step at this batch size.

    python -m loraplex.bench.engine_throughput --requests 32 --new-tokens 64 --adapters 32 --rank 16
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from .workload import ATTENTION, Timer, machine, make_adapters, prompts, write_json


def run_loraplex(model_dir: Path, texts: list[str], adapters: list[Path] | None, new_tokens: int,
                 repeats: int) -> tuple[float, list]:
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    engine = Engine(EngineConfig(model=str(model_dir), max_loras=max(1, len(adapters or [])), max_running=len(texts)))
    names = []
    for i, path in enumerate(adapters or []):
        engine.register_adapter(f"a{i}", str(path))
        names.append(f"a{i}")
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    warm = [Request(prompt=t, params=SamplingParams(max_new_tokens=2), adapter=(names[i] if names else None))
            for i, t in enumerate(texts)]
    engine.generate(warm)  # loads adapters into slots, warms allocators
    rates = []
    for _ in range(repeats):
        requests = [Request(prompt=t, params=params, adapter=(names[i % len(names)] if names else None))
                    for i, t in enumerate(texts)]
        with Timer() as t:
            results = engine.generate(requests)
        assert all(r.error is None and len(r.token_ids) == new_tokens for r in results)
        rates.append(len(texts) * new_tokens / t.seconds)
    return statistics.median(rates), [r.token_ids for r in results]


def _hf_inputs(tokenizer, texts: list[str]):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True)


def run_hf(model, tokenizer, texts: list[str], new_tokens: int, repeats: int, **generate_kwargs) -> tuple[float, list]:
    inputs = _hf_inputs(tokenizer, texts)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    rates = []
    with torch.inference_mode():
        model.generate(**inputs, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(repeats):
            with Timer() as t:
                out = model.generate(**inputs, **kwargs)
            rates.append(len(texts) * new_tokens / t.seconds)
    generated = out[:, inputs["input_ids"].shape[1]:]
    return statistics.median(rates), generated.tolist()


def matmul_ceiling(model_dir: Path, batch: int, repeats: int = 5) -> float:
    """Tokens/s if a decode step cost only its dense matrix multiplies (all layers + lm_head)."""
    from loraplex.server.engine.loader import load_config
    from loraplex.server.engine.model_config import spec_from_hf_config

    s = spec_from_hf_config(load_config(model_dir))
    shapes = [(s.q_size + 2 * s.kv_size, s.hidden_size), (s.hidden_size, s.q_size),
              (2 * s.intermediate_size, s.hidden_size), (s.hidden_size, s.intermediate_size)]
    weights = [torch.randn(o, i) for o, i in shapes]
    lm_head = torch.randn(s.vocab_size, s.hidden_size)
    xs = [torch.randn(batch, w.shape[1]) for w in weights]
    h = torch.randn(batch, s.hidden_size)

    def step() -> None:
        for _ in range(s.num_layers):
            for x, w in zip(xs, weights):
                F.linear(x, w)
        F.linear(h, lm_head)

    step()
    with Timer() as t:
        for _ in range(repeats):
            step()
    return batch * repeats / t.seconds


def agreement(a: list[list[int]], b: list[list[int]], eos: set[int], prefix: int = 16) -> float:
    """Fraction of requests whose first `prefix` tokens (up to an EOS in either) are equal."""
    same = 0
    for x, y in zip(a, b):
        n = prefix
        for seq in (x, y):
            for i, tok in enumerate(seq[:prefix]):
                if tok in eos:
                    n = min(n, i)
        same += x[:n] == y[:n]
    return same / len(a)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the converted SmolLM2)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, nargs="+", default=[16], help="ranks, cycled over the adapters")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="bench/out", help="directory for adapters and results")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per contender (the median is reported)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.server.engine.loader import resolve_model

    model_dir = resolve_model(args.model)
    out = Path(args.out)
    adapters = make_adapters(model_dir, out / "adapters", args.adapters, args.rank, ATTENTION)
    texts = prompts(args.requests)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = {tokenizer.eos_token_id}

    rows = {}
    load_before = os.getloadavg()[0]
    n, k = args.new_tokens, args.repeats
    rows["loraplex base"], lp_base = run_loraplex(model_dir, texts, None, n, k)
    rows[f"loraplex {args.adapters} adapters"], lp_lora = run_loraplex(model_dir, texts, adapters, n, k)
    gc.collect()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows["HF generate base"], hf_base = run_hf(hf, tokenizer, texts, n, k)
    checks = {"loraplex base vs HF base (first 16 tokens)": agreement(lp_base, hf_base, eos)}
    if not args.skip_peft:
        peft_model = PeftModel.from_pretrained(hf, adapters[0], adapter_name="a0")
        for i, path in enumerate(adapters[1:], 1):
            peft_model.load_adapter(path, adapter_name=f"a{i}")
        peft_model.eval()
        names = [f"a{i % len(adapters)}" for i in range(len(texts))]
        rows[f"PEFT mixed batch, {args.adapters} adapters"], peft_out = run_hf(
            peft_model, tokenizer, texts, n, k, adapter_names=names)
        checks["loraplex adapters vs PEFT adapters (first 16 tokens)"] = agreement(lp_lora, peft_out, eos)
    rows[f"matmul ceiling (batch {args.requests})"] = matmul_ceiling(model_dir, args.requests)

    base = rows["loraplex base"]
    result = {
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "config": vars(args),
        "tokens_per_s": rows,
        "ratios": {
            "loraplex adapters / loraplex base": rows[f"loraplex {args.adapters} adapters"] / base,
            "loraplex base / HF base": base / rows["HF generate base"],
        },
        "agreement": checks,
    }
    if not args.skip_peft:
        result["ratios"]["loraplex adapters / PEFT adapters"] = (
            rows[f"loraplex {args.adapters} adapters"] / rows[f"PEFT mixed batch, {args.adapters} adapters"])
    write_json(out / "engine_throughput.json", result)
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["| contender | tokens/s |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["tokens_per_s"].items()]
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    lines += ["", "| greedy agreement | fraction of requests |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["agreement"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
