"""The four ways to adapt the base model: LoRA, QLoRA, prompt tuning and full fine-tuning.

`prepare` loads the base and returns it ready to train: a PEFT model for the first three (only
the adapter's parameters train), the plain model with every weight trainable for `full`.
QLoRA loads the base in bitsandbytes NF4 (built as transformers builds it, so loraplex's
`--quantize nf4` serves the same 4-bit weights) and applies PEFT's k-bit preparation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

METHODS = ("lora", "qlora", "prompt-tuning", "full")
PROMPT_INITS = ("random", "sample-vocab", "text")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class MethodOptions:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    virtual_tokens: int = 16
    prompt_init: str = "random"
    init_text: str | None = None


def load_base(model_dir: Path, method: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if not torch.cuda.is_available():
            kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method == "qlora":
        keep_float_cpu_kernel(model)
    return model


def keep_float_cpu_kernel(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its bfloat16 CPU kernel. It repacks a
    layer the first time it runs without gradients (an evaluation pass) and does not unpack it when
    training resumes, after which training diverges (loss 0.01 -> 13.6 on SmolLM2 right after the
    first evaluation); the engine keeps the float kernel for the same layers too."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def peft_config(method: str, opts: MethodOptions, model_dir: Path):
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit

    if method in ("lora", "qlora"):
        return LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, use_rslora=opts.rslora,
                          target_modules=list(opts.target_modules), bias="none", task_type="CAUSAL_LM")
    init = {"random": PromptTuningInit.RANDOM, "sample-vocab": PromptTuningInit.SAMPLE_VOCAB,
            "text": PromptTuningInit.TEXT}[opts.prompt_init]
    extra = {}
    if init is PromptTuningInit.TEXT:
        extra = {"prompt_tuning_init_text": opts.init_text, "tokenizer_name_or_path": str(model_dir)}
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=opts.virtual_tokens,
                              prompt_tuning_init=init, **extra)


def prepare(method: str, model_dir: Path, opts: MethodOptions):
    """The model to train, with only the method's parameters requiring gradients."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    model = load_base(model_dir, method)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, peft_config(method, opts, model_dir))


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters. A 4-bit weight packs two values per stored byte, so the
    total counts values, not storage."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
