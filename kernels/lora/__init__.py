"""LoRA compute ops with three paths each: a naive reference (the test oracle), a vectorised
PyTorch path (CPU serving) and a Triton kernel (GPU serving).

`get_lora_ops(name, device)` picks a path: "auto" (Triton on CUDA when triton imports, PyTorch
elsewhere), "torch", "triton" or "reference". Triton is imported only when asked for.
"triton" on a CPU device runs Triton in its interpreter (float32/float16, slow: for tests):
unless the environment says otherwise, TRITON_INTERPRET=1 is set before the Triton module is
first imported. Triton reads that variable when the kernels are defined, so a process that
imported the Triton path for a GPU first cannot switch it to the CPU later.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import cast

import torch

from .contract import LoraOps
from .lora_groups import TokenGroups

_PATHS = {"torch": "lora_torch", "reference": "lora_reference", "triton": "lora_triton"}


def get_lora_ops(name: str = "auto", device: torch.device | str = "cpu") -> LoraOps:
    """The module implementing the `LoraOps` contract for this choice and device."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name not in _PATHS:
        raise ValueError(f"unknown kernels {name!r}: choose auto, torch, triton or reference")
    if name == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU: its interpreter (read at import)
    try:
        return cast(LoraOps, importlib.import_module(f"{__name__}.{_PATHS[name]}"))
    except ImportError as exc:
        raise ValueError(f"--kernels {name} is not available here: {exc}") from exc


def _triton_available() -> bool:
    has_kernel = importlib.util.find_spec(f"{__name__}.{_PATHS['triton']}") is not None
    return has_kernel and importlib.util.find_spec("triton") is not None


__all__ = ["LoraOps", "TokenGroups", "get_lora_ops"]
