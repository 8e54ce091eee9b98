"""Decode throughput with many distinct adapters in one batch, against the peers that run here.

Contenders, all in this one process, float32, the same thread count, the same prompts, every
request generating exactly `new_tokens` tokens:
- loraplex, base model only, and with one distinct LoRA adapter per request;
- Hugging Face `generate`, base model only (left-padded batch);
- PEFT `generate(adapter_names=...)` with the same adapters (its mixed-adapter batch);
- the machine's ceiling: the bare matrix multiplies of the decode steps at this batch size, with
  F.linear and with oneDNN-prepacked weights (what the engine uses on a CPU); the faster counts.
Contenders are prepared once, then timed round-robin `--repeats` times (this machine's speed
drifts by ±15% from minute to minute; interleaving spreads that over every contender), and the
median rate of each is reported.

    python -m loraplex.bench.engine_throughput --requests 32 --new-tokens 64 --adapters 32 --rank 16
"""
from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from .workload import ATTENTION, Timer, machine, make_adapters, prompts, write_json

Run = Callable[[], list[list[int]]]  # one timed workload -> generated ids per request


def loraplex_runs(model_dir: Path, texts: list[str], adapters: list[Path], new_tokens: int, device: str = "cpu",
                  quantize: str = "none") -> tuple[Run, Run]:
    """(base-only run, one-adapter-per-request run) on one engine."""
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    # no prefix cache: every round replays the same prompts, and HF computes them every time
    engine = Engine(EngineConfig(model=str(model_dir), max_loras=max(1, len(adapters)), max_running=len(texts),
                                 prefix_caching=False, device=device, quantize=quantize))
    names = [f"a{i}" for i in range(len(adapters))]
    for name, path in zip(names, adapters):
        engine.register_adapter(name, str(path))

    def run(with_adapters: bool, tokens: int = new_tokens) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        requests = [Request(prompt=t, params=params, adapter=names[i % len(names)] if with_adapters else None)
                    for i, t in enumerate(texts)]
        results = engine.generate(requests)
        assert all(r.error is None and len(r.token_ids) == tokens for r in results)
        return [r.token_ids for r in results]

    run(True, 2)  # loads every adapter into its slot, warms allocators
    return (lambda: run(False)), (lambda: run(True))


def hf_model(model_dir: Path, device: str = "cpu", quantize: str = "none"):
    """The Hugging Face model the peers run: float32 on `device`, or its projections quantized by
    bitsandbytes as loraplex's `--quantize` does (4-bit without double quantization, float32
    compute, the same float CPU kernel)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantize in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                                           bnb_4bit_compute_dtype=torch.float32)
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantize != "none":
        raise ValueError(f"unknown quantize {quantize!r}: choose none, nf4, fp4 or int8")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device, **kwargs)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def hf_run(model, tokenizer, texts: list[str], new_tokens: int, **generate_kwargs) -> Run:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id, **generate_kwargs)

    @torch.inference_mode()
    def run(tokens: int = new_tokens) -> list[list[int]]:
        out = model.generate(**inputs, **{**kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens})
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    run(2)
    return run


def matmul_ceiling_run(model_dir: Path, batch: int, steps: int, prepack: bool = False, device: str = "cpu") -> Run:
    """The dense float32 matrix multiplies of `steps` decode steps (all layers + lm_head), nothing
    else, on `device`: with F.linear, or (`prepack`) with oneDNN-prepacked weights as the engine
    runs them on a CPU."""
    from loraplex.server.engine.loader import load_config
    from loraplex.server.engine.model_config import spec_from_hf_config
    from loraplex.server.engine.quantize import DenseLinear

    s = spec_from_hf_config(load_config(model_dir))
    shapes = [(s.q_size + 2 * s.kv_size, s.hidden_size), (s.hidden_size, s.q_size),
              (2 * s.intermediate_size, s.hidden_size), (s.hidden_size, s.intermediate_size)]
    layers = [[DenseLinear(torch.randn(o, i, device=device), None, prepack) for o, i in shapes]
              for _ in range(s.num_layers)]
    lm_head = DenseLinear(torch.randn(s.vocab_size, s.hidden_size, device=device), None, prepack)
    xs = [torch.randn(batch, i, device=device) for _, i in shapes]
    h = torch.randn(batch, s.hidden_size, device=device)

    @torch.inference_mode()
    def run() -> list[list[int]]:
        for _ in range(steps):
            for layer in layers:
                for x, linear in zip(xs, layer):
                    linear(x)
            lm_head(h)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return []

    return run


def ceiling_runs(model_dir: Path, batch: int, steps: int, device: str = "cpu") -> dict[str, Run]:
    """The bare-matmul contenders: F.linear and, where oneDNN runs, prepacked weights."""
    from loraplex.server.engine.quantize import prepack_supported

    runs = {CEILING_TORCH: matmul_ceiling_run(model_dir, batch, steps, device=device)}
    if prepack_supported(torch.float32, torch.device(device)):
        runs[CEILING_ONEDNN] = matmul_ceiling_run(model_dir, batch, steps, prepack=True, device=device)
    return runs


CEILING_TORCH, CEILING_ONEDNN = "matmul ceiling, F.linear", "matmul ceiling, oneDNN"


def ceiling_rates(rates: dict[str, list[float]]) -> list[float]:
    """Per round, the faster of the bare-matmul contenders: the machine's ceiling."""
    return [max(r) for r in zip(*(rates[k] for k in (CEILING_TORCH, CEILING_ONEDNN) if k in rates))]


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a's rate over b's rate in the same round (drift cancels out)."""
    return statistics.median(x / y for x, y in zip(a, b))


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
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (the median of each contender is reported)")
    p.add_argument("--out", default="bench/out", help="directory for adapters and results")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--device", default="cpu", help="where every contender runs: cpu, cuda, ...")
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4", "int8"],
                   help="the base model's weights for loraplex and its peers (the ceiling stays float32)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraplex.server.engine.loader import resolve_model

    model_dir = resolve_model(args.model)
    out = Path(args.out)
    adapters = make_adapters(model_dir, out / "adapters", args.adapters, args.rank, ATTENTION)
    texts = prompts(args.requests)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = args.new_tokens
    label_lora = f"loraplex {args.adapters} adapters"
    label_peft = f"PEFT mixed batch, {args.adapters} adapters"

    contenders: dict[str, Run] = {}
    contenders["loraplex base"], contenders[label_lora] = loraplex_runs(model_dir, texts, adapters, n, args.device,
                                                                        args.quantize)
    base_model = hf_model(model_dir, args.device, args.quantize)
    contenders["HF generate base"] = hf_run(base_model, tokenizer, texts, n)
    if not args.skip_peft:
        peft_model = PeftModel.from_pretrained(hf_model(model_dir, args.device, args.quantize), adapters[0],
                                               adapter_name="a0")
        for i, path in enumerate(adapters[1:], 1):
            peft_model.load_adapter(path, adapter_name=f"a{i}")
        peft_model.eval()
        names = [f"a{i % len(adapters)}" for i in range(len(texts))]
        contenders[label_peft] = hf_run(peft_model, tokenizer, texts, n, adapter_names=names)
    contenders.update(ceiling_runs(model_dir, args.requests, n, args.device))

    rates: dict[str, list[float]] = {k: [] for k in contenders}
    outputs: dict[str, list[list[int]]] = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in contenders.items():
            with Timer() as t:
                outputs[name] = run()
            rates[name].append(args.requests * n / t.seconds)
    rows = {k: statistics.median(v) for k, v in rates.items()}

    eos = {tokenizer.eos_token_id}
    checks = {"loraplex base vs HF base (first 16 tokens)":
              agreement(outputs["loraplex base"], outputs["HF generate base"], eos)}
    rates["matmul ceiling (faster)"] = ceiling_rates(rates)
    pairs = [(label_lora, "loraplex base"), ("loraplex base", "HF generate base"),
             ("matmul ceiling (faster)", "loraplex base")]  # = loraplex's run time / the matmuls' time
    if not args.skip_peft:
        checks["loraplex adapters vs PEFT adapters (first 16 tokens)"] = agreement(
            outputs[label_lora], outputs[label_peft], eos)
        pairs.append((label_lora, label_peft))
    ratios = {f"{a} / {b}": paired_ratio(rates[a], rates[b]) for a, b in pairs}
    result = {
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "config": vars(args),
        "tokens_per_s": rows,
        "runs_tokens_per_s": rates,
        "ratios": ratios,
        "agreement": checks,
    }
    write_json(out / "engine_throughput.json", result)
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["| contender | tokens/s (median) | runs |", "| --- | ---: | --- |"]
    lines += [f"| {k} | {v:.1f} | {', '.join(f'{r:.0f}' for r in result['runs_tokens_per_s'][k])} |"
              for k, v in result["tokens_per_s"].items()]
    lines += ["", "| ratio (median of per-round ratios) | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    lines += ["", "| greedy agreement | fraction of requests |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["agreement"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
