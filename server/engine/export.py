"""`loraplex merge`: write a standalone Hugging Face model with one LoRA adapter merged in.

    loraplex merge --model PATH --adapter DIR --out DIR

The output directory holds the merged weights (safetensors), the config and the tokenizer, and
`transformers` loads it on its own. Weights keep the source's dtype; every merge is computed in
float32 (`kernels.merge`), W + scale·B·A per targeted module, as PEFT's merge_and_unload does.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SKIPPED_FILES = ("model.safetensors.index.json",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    p.add_argument("--out", required=True, help="directory to write (must not exist, or be empty)")
    p.add_argument("--max-lora-rank", type=int, default=1024)
    return p


def export_merged(model: str | None, adapter_dir: str, out: str, max_rank: int = 1024) -> Path:
    """Merge `adapter_dir` into `model` and write the result to `out`; returns the output path."""
    import torch
    from safetensors.torch import save_file

    from loraplex.kernels import lora_torch

    from . import loader
    from .adapter_errors import AdapterError
    from .adapter_format import BaseModelShape, weight_key
    from .adapters import LoraAdapter, load_adapter
    from .model_config import spec_from_hf_config

    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} exists and is not empty")
    source = loader.resolve_model(model)
    spec = spec_from_hf_config(loader.load_config(source), str(model or source))
    base = BaseModelShape(spec.num_layers, spec.hidden_size, spec.projection_shapes(), spec.name_or_path)
    adapter = load_adapter(adapter_dir, Path(adapter_dir).name, base, max_rank, torch.float32)
    if not isinstance(adapter, LoraAdapter):
        raise AdapterError(f"{adapter_dir} is a soft prompt: only LoRA adapters merge into weights")
    weights = loader.load_weights(source, torch.float32)
    dtypes = _source_dtypes(source)
    for (layer, proj), (a, b) in adapter.weights.items():
        key = weight_key(layer, proj)
        lora_torch.merge(weights[key], a, b, 1.0, weights[key])  # scale already folded into b
    state = {k: v.to(dtypes.get(k, torch.float32)).contiguous() for k, v in weights.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=target.parent))
    try:
        for item in source.iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and item.name not in SKIPPED_FILES:
                shutil.copy2(item, staging / item.name)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "loraplex_merge.json").write_text(json.dumps(
            {"base_model": str(model or source), "adapter": str(adapter_dir)}, indent=2))
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _source_dtypes(source: Path) -> dict:
    from safetensors import safe_open

    from .loader import weight_files

    dtypes = {}
    for file in weight_files(source):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                dtypes[key] = f.get_slice(key).get_dtype()
    return {k: _torch_dtype(v) for k, v in dtypes.items()}


def _torch_dtype(name: str):
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(
        name, torch.float32)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from .adapter_errors import AdapterError

    try:
        out = export_merged(args.model, args.adapter, args.out, args.max_lora_rank)
    except (AdapterError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
