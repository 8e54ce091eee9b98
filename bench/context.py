"""What every scenario is given: the model, where to write, the size of the run, the threads."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchContext:
    model_dir: Path  # a Hugging Face directory (the default GGUF already converted)
    out: Path  # results of this run
    work: Path  # generated adapters and stores, reused across runs
    quick: bool
    threads: int
    device: str = "cpu"  # where loraplex and its peers run (cpu, cuda, cuda:1, ...)
    quantize: str = "none"  # the base model's weights: none (float32), nf4, fp4 or int8 (bitsandbytes)

    def engine_flags(self) -> list[str]:
        """`loraplex serve` flags for this run's device and base."""
        return ["--device", self.device, "--quantize", self.quantize]

    def size(self, quick, full):
        """`quick` in a --quick run, else `full`."""
        return quick if self.quick else full

    def log(self, message: str) -> None:
        print(f"[bench] {message}", flush=True)
