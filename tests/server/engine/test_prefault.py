"""populate: the pages of fresh CPU tensors are in memory afterwards, and nothing already
written changes (it runs beside the engine's own writes)."""
from __future__ import annotations

import math
import mmap
import sys

import pytest
import torch

from loraplex.server.engine.prefault import populate, resident_fraction

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE) is Linux's")


def _fresh(*shape: int) -> torch.Tensor:
    """A float32 tensor over a new anonymous mapping: none of its pages is in memory yet (memory
    from torch.empty may be reused, already faulted in)."""
    memory = mmap.mmap(-1, 4 * math.prod(shape))
    return torch.frombuffer(memory, dtype=torch.float32).view(*shape)


def test_populate_faults_in_exactly_the_pages_asked_for():
    pool = _fresh(8, 1024, 1024)  # 32 MiB
    assert resident_fraction(pool[2]) == 0.0 and resident_fraction(pool[5]) == 0.0
    assert populate([pool[2]])
    assert resident_fraction(pool[2]) == 1.0
    assert resident_fraction(pool[5]) == 0.0  # the rest is left alone


def test_populate_keeps_what_is_already_written():
    pool = torch.empty(4, 512, 1024)
    pool[1].copy_(torch.arange(512 * 1024, dtype=torch.float32).view(512, 1024))
    expected = pool[1].clone()
    assert populate([pool[0], pool[1], pool[2][:7]])  # neighbours share edge pages with pool[1]
    assert torch.equal(pool[1], expected)


def test_populate_skips_what_it_cannot_address():
    assert populate([torch.empty(0), torch.empty(64, 64).t()])  # empty, and not contiguous
