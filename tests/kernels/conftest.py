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


# A fused layer's problems, as the engine builds them: slices of one output (say q/k/v) with
# widths that are not powers of two, adapters with different ranks per slice (some leave a
# slice alone), rows without adapter, and one problem with a zero-length segment.
SLICE_WIDTHS = {"q": 136, "k": 40, "v": 72}
ADAPTER_RANKS = [  # slot -> rank per slice (absent: the adapter does not touch that slice)
    {"q": 1, "k": 1, "v": 1},
    {"q": 16, "k": 16, "v": 16},
    {"q": 128, "v": 128},
    {"q": 33, "k": 4, "v": 64},
    {"k": 8},
    {"q": 100, "k": 16, "v": 2},
]


def build_fused_case(form: str, dtype: torch.dtype, seed: int = 0, in_f: int = 200):
    """-> (x [T, in], y0 [T, out_total], problems [(a_pool, b_pool, starts, lens, entries, col)],
    expected float32 y, rows without adapter). `form`: "decode" (one row per sequence) or "prefill"."""
    gen = torch.Generator().manual_seed(seed)
    seq_slots = [-1, 0, 1, 2, -1, 3, 4, 5, 1, 3, -1, 0, 5, 2, 4, -1] if form == "decode" else [-1, 3, 0, 5, -1, 2, 1, 4]
    seq_rows = 1 if form == "decode" else 5
    cols, col = {}, 0
    for name, width in SLICE_WIDTHS.items():
        cols[name], col = col, col + width
    T = len(seq_slots) * seq_rows
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    y0 = torch.randn(T, col, generator=gen).to(dtype)
    problems, expected = [], y0.float().clone()
    for name, width in SLICE_WIDTHS.items():
        by_rank: dict[int, list[int]] = {}
        for slot, ranks in enumerate(ADAPTER_RANKS):
            if name in ranks:
                by_rank.setdefault(ranks[name], []).append(slot)
        for rank, slots in sorted(by_rank.items()):
            entries = {slot: 2 * i + 1 for i, slot in enumerate(slots)}  # pool entries out of order
            a_pool = (torch.randn(2 * len(slots) + 1, rank, in_f, generator=gen) / in_f**0.5).to(dtype)
            b_pool = (torch.randn(2 * len(slots) + 1, width, rank, generator=gen) / rank**0.5).to(dtype)
            starts, lens, ents = [], [], []
            for b, slot in enumerate(seq_slots):
                if slot in entries:
                    starts.append(b * seq_rows)
                    lens.append(seq_rows)
                    ents.append(entries[slot])
            if name == "k" and rank == 16:  # an adapter present in the class with no row this step
                starts.insert(1, starts[1])
                lens.insert(1, 0)
                ents.insert(1, 0)
            problems.append((a_pool, b_pool, starts, lens, ents, cols[name]))
            for s, n, e in zip(starts, lens, ents):
                for row in range(s, s + n):
                    update = b_pool[e].float() @ (a_pool[e].float() @ x[row].float())
                    expected[row, cols[name] : cols[name] + width] += update
    unserved = [b * seq_rows + k for b, slot in enumerate(seq_slots) if slot < 0 for k in range(seq_rows)]
    return x, y0, problems, expected, unserved


@pytest.fixture(scope="session")
def fused_case():
    """The builder of a fused layer's problems (see `build_fused_case`)."""
    return build_fused_case
