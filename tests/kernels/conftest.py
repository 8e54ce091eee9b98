"""Kernel tests run the Triton kernels on CPU in Triton's interpreter, unless a GPU is present.

Triton decides whether a kernel is interpreted when the kernel is defined (when
`loraplex.kernels.lora_triton` is first imported), so TRITON_INTERPRET=1 is set here, before any
test module imports it. The interpreter serves float32/float16 only (no bfloat16) and runs one
program at a time; the tests keep to the module's fixed block sizes. Where a CUDA device exists
(and TRITON_INTERPRET is not forced), the same tests run the kernels on it instead.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """Where the Triton kernels run: the GPU when one is present and not interpreted, else the CPU."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    return torch.device("cpu")
