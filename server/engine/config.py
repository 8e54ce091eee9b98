"""Engine settings (the `serve` and `generate` flags map onto these)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_MATMULS = ("auto", "onednn", "torch")
# A GPU step costs about the same up to hundreds of tokens: prefill in big chunks there.
GPU_PREFILL_CHUNK_TOKENS = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None  # Hugging Face directory or .gguf file; None: SmolLM2-135M-Instruct
    dtype: str = "float32"
    quantize: str = "none"  # none | nf4 | fp4 | int8 (bitsandbytes, base projections only)
    device: str = "auto"  # auto: cuda when available, else cpu
    kernels: str = "auto"  # auto | torch | triton | reference
    max_running: int = 64  # sequences decoding at once
    max_batch_tokens: int = 4096  # prompt tokens prefilled in one step
    # prompt tokens per step while others decode (capped by the above); None: auto, the decoding
    # rows plus 16 on a CPU (scheduler.py: a step stays near twice a decode-only one), 256 on a GPU
    prefill_chunk_tokens: int | None = None
    max_total_tokens: int = 32768  # KV-cache capacity, in tokens
    block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True  # reuse computed KV blocks of prompts that begin alike (block_manager.py)
    max_model_len: int | None = None  # context limit; default and upper bound: the model's own
    max_loras: int = 32  # adapters resident in device slots at once
    max_cpu_loras: int = 128  # loaded adapters kept in host memory
    max_lora_rank: int = 64
    dynamic_merge: bool = False  # merge an adapter that dominates the running batch (merging.py)
    merge_high: float = 0.75  # share of running sequences that triggers a merge ...
    merge_low: float = 0.5  # ... and the share under which it is undone
    merge_patience: int = 8  # consecutive steps either condition must hold
    threads: int | None = None  # torch CPU threads (None: leave torch's default)
    cpu_matmul: str = "auto"  # auto | onednn | torch: how unquantized CPU projections multiply (quantize.py)

    def chunk_tokens(self) -> int | None:
        """The fixed prefill budget while others decode, or None for the scheduler's auto budget."""
        if self.prefill_chunk_tokens is None and self.torch_device().type != "cpu":
            return GPU_PREFILL_CHUNK_TOKENS
        return self.prefill_chunk_tokens

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def validate(self) -> None:
        self.torch_dtype()
        if self.cpu_matmul not in CPU_MATMULS:
            raise ValueError(f"unknown cpu_matmul {self.cpu_matmul!r}: choose one of {', '.join(CPU_MATMULS)}")
        for name in ("max_running", "max_batch_tokens", "prefill_chunk_tokens", "max_total_tokens", "block_size",
                     "max_loras", "max_cpu_loras", "max_lora_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
