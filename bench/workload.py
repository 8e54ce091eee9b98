"""Shared pieces of the benchmarks: prompts, random PEFT adapters for a model, timing helpers."""
from __future__ import annotations

import json
import platform
import time
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
