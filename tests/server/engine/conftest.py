"""The correctness reference: Hugging Face models with `peft` adapters, run one request at a time."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


@dataclass
class Reference:
    tokens: list[int]  # greedy continuation
    logits: torch.Tensor  # [len(prompt) + len(tokens), vocab] teacher-forced, real positions only
    margins: list[float]  # top-1 minus top-2 logit at each generated step


def load_reference(model_dir: Path, lora: Path | None = None, soft: Path | None = None, quantize: str | None = None,
                   merge: bool = True):
    """The PEFT model serving `lora` and/or `soft` on the base.

    PEFT cannot stack prompt tuning on a LoRA model: for both together, by default (DESIGN.md)
    the LoRA is merged into the float base (merge_and_unload) and the prompt-tuning adapter
    applied on top. With merge=False, or on a quantized base (where merging would re-quantize),
    PEFT's LoRA model is fed the soft prompt's vectors in front of the prompt embeddings, which
    is what prompt tuning does; merging itself moves the logits of a 30-layer model by up to
    about 7e-5, most of the 1e-4 budget.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantize in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    for module in model.modules():  # the same float kernel the engine uses (see quantize.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    soft_vectors = None
    if lora is not None and soft is not None and (quantize or not merge):
        from safetensors.torch import load_file

        soft_vectors = load_file(str(soft / "adapter_model.safetensors"))["prompt_embeddings"].float()
        model = PeftModel.from_pretrained(model, lora)
    elif lora is not None and soft is not None:
        model = PeftModel.from_pretrained(model, lora).merge_and_unload()
        model = PeftModel.from_pretrained(model, soft)
    elif lora is not None or soft is not None:
        model = PeftModel.from_pretrained(model, lora or soft)
    model.eval()
    return model, soft_vectors


@torch.no_grad()
def reference_logits(model, ids: list[int], soft_vectors: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [len(ids), vocab] for real positions (virtual ones dropped)."""
    input_ids = torch.tensor([ids])
    if soft_vectors is not None:
        embeds = model.get_input_embeddings()(input_ids)
        embeds = torch.cat([soft_vectors[None].to(embeds.dtype), embeds], dim=1)
        logits = model(inputs_embeds=embeds).logits[0]
    else:
        logits = model(input_ids=input_ids).logits[0]
    return logits[-len(ids):].float()


def reference_greedy(model, prompt: list[int], steps: int, soft_vectors=None) -> Reference:
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(steps):
        last = reference_logits(model, prompt + tokens, soft_vectors)[-1]
        top = torch.topk(last, 2).values
        margins.append(float(top[0] - top[1]))
        tokens.append(int(last.argmax()))
    logits = reference_logits(model, prompt + tokens, soft_vectors)
    return Reference(tokens, logits, margins)


def comparable_steps(ref: Reference, atol: float) -> int:
    """Generated tokens are compared up to the first near-tie (margin below 2 * atol), which a
    different summation order may legitimately flip."""
    for i, m in enumerate(ref.margins):
        if m < 2 * atol:
            return i
    return len(ref.margins)


@pytest.fixture(scope="session")
def reference() -> SimpleNamespace:
    return SimpleNamespace(load=load_reference, greedy=reference_greedy, logits=reference_logits,
                           comparable=comparable_steps)
