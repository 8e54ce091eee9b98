"""Shared pieces of the benchmarks: prompts, random PEFT adapters for a model, timing helpers."""
from __future__ import annotations

import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

TOPICS = [
    "the history of bridges", "how bees make honey", "a recipe for bread", "the rules of chess",
    "why the sky is blue", "learning a new language", "the water cycle", "how a compiler works",
    "saving money", "the moon landing", "growing tomatoes", "how vaccines work",
    "a walk in the forest", "the life of a star", "writing a good email", "the invention of paper",
]


def prompts(n: int) -> list[str]:
    return [f"Write a few sentences about {TOPICS[i % len(TOPICS)]} (note {i})." for i in range(n)]


def make_adapters(model_dir: Path, out: Path, count: int, ranks: list[int], targets: list[str] = ATTENTION,
                  seed: int = 0) -> list[Path]:
    """`count` PEFT LoRA adapters with random non-zero weights (rank i-th of `ranks`, cycling),
    cached in `out` so repeated runs reuse them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    base = None
    for i in range(count):
        r = ranks[i % len(ranks)]
        path = out / f"lora-{i:04d}-r{r}-{'-'.join(t[0] for t in targets)}"
        paths.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        if base is None:
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in name else 0.05))
        model.save_pretrained(path)
        base = model.unload()
    return paths


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


Contender = Callable[[int], list[list[int]]]  # round number -> generated ids of each sequence


def timed_rounds(contenders: dict[str, Contender], repeats: int, new_tokens: int
                 ) -> tuple[dict[str, list[list[int]]], dict[str, list[float]], dict[str, float]]:
    """Round 0 runs every contender once (warm-up; its outputs are returned for the caller's
    checks), then rounds 1..`repeats` time them round-robin, so the machine's drift spreads over
    all of them. Every sequence must generate `new_tokens` tokens.
    -> (round-0 outputs, seconds per timed run, tokens/s from the median run)."""
    outputs = {name: run(0) for name, run in contenders.items()}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(1, repeats + 1):
        for name, run in contenders.items():
            start = time.perf_counter()
            got = run(round_)
            seconds[name].append(time.perf_counter() - start)
            assert all(len(ids) == new_tokens for ids in got), name
    rates = {name: len(outputs[name]) * new_tokens / statistics.median(s) for name, s in seconds.items()}
    return outputs, seconds, rates


def print_rates(rates: dict[str, float]) -> None:
    """One line per contender, with how much slower than the first it ran."""
    first = next(iter(rates))
    width = max(map(len, rates))
    for name, rate in rates.items():
        slower = f"   {rates[first] / rate:5.2f}x slower" if name != first else ""
        print(f"  {name:{width}s} {rate:7.1f} tokens/s{slower}")


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def module_path(layer: int, proj: str) -> str:
    """PEFT's key prefix of one projection of a Llama-family layer."""
    from loraplex.server.engine.adapter_format import module_name

    return f"base_model.model.{module_name(layer, proj)}"


@functools.lru_cache(maxsize=4)
def base_shape(model_dir: Path):
    """The served model's projection shapes (a `BaseModelShape`)."""
    from loraplex.server.engine.adapter_format import BaseModelShape
    from loraplex.server.engine.loader import load_config

    return BaseModelShape.from_hf_config(load_config(model_dir), str(model_dir))


def write_lora(model_dir: Path, out: Path, rank: int, targets: list[str] = ATTENTION, seed: int = 0) -> Path:
    """A PEFT-format LoRA adapter with random weights, written directly (no model is loaded), so
    that a thousand of them take seconds; `make_adapters` goes through PEFT itself instead."""
    from safetensors.torch import save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    shape = base_shape(model_dir)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for proj in targets:
            rows, cols = shape.projection_shapes[proj]
            key = module_path(layer, proj)
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": str(model_dir)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def write_loras(model_dir: Path, out: Path, count: int, ranks: list[int], targets: list[str] = ATTENTION,
                seed: int = 0) -> list[Path]:
    """`count` adapters from `write_lora`, rank i-th of `ranks` (cycling), cached in `out`."""
    tag = "-".join(t[0] for t in targets)
    return [write_lora(model_dir, out / f"raw-{i:04d}-r{ranks[i % len(ranks)]}-{tag}", ranks[i % len(ranks)],
                       targets, seed + i) for i in range(count)]
