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

    def size(self, quick, full):
        """`quick` in a --quick run, else `full`."""
        return quick if self.quick else full

    def log(self, message: str) -> None:
        print(f"[bench] {message}", flush=True)
