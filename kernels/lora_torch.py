"""Vectorised PyTorch LoRA ops (the CPU serving path).

Two forms, the same result (see `lora_reference` for the meaning):
- gather form (decode, about one token per adapter): each token's weights are gathered from
  the pool and one batched matmul serves every token;
- segment form (prefill, many tokens per adapter): one matmul per active adapter over its
  contiguous rows, done by `grouped_mm` in a single call.
Each rank class is served at its own rank: nothing is padded to the batch's largest rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora_groups import TokenGroups

# Gather form while a segment averages at most this many rows; segment form beyond.
GATHER_ROWS_PER_SEGMENT = 2


def _use_gather_form(groups: TokenGroups) -> bool:
    return groups.num_rows <= GATHER_ROWS_PER_SEGMENT * groups.num_segments


def _segment_matmul(x: torch.Tensor, w: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """x [n, k], w [G, m, k] -> [n, m]: each segment's rows times its own w[g]^T.

    `grouped_mm` needs 16-byte aligned strides; other shapes (say rank 2 in float32) take
    one matmul per segment instead."""
    if (x.shape[1] * x.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0:
        return F.grouped_mm(x.contiguous(), w.transpose(1, 2), offs=groups.seg_offsets)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, n in enumerate(groups.seg_lens.tolist()):
        out[start : start + n] = x[start : start + n] @ w[g].t()
        start += n
    return out


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """x [T, in], a_pool [S, r, in] -> xa [n, r]: xa[i] = a_pool[row_slots[i]] @ x[row_i]."""
    xs = groups.gather_rows(x)  # [n, in]
    if groups.num_segments == 1:
        return xs @ a_pool[int(groups.seg_slots[0])].t()
    if _use_gather_form(groups):
        a = a_pool.index_select(0, groups.row_slots)  # [n, r, in]
        return torch.bmm(a, xs.unsqueeze(2)).squeeze(2)
    a = a_pool.index_select(0, groups.seg_slots)  # [G, r, in]
    return _segment_matmul(xs, a, groups)


def lora_expand(xa: torch.Tensor, b_pool: torch.Tensor, groups: TokenGroups, y: torch.Tensor) -> None:
    """xa [n, r], b_pool [S, out, r], y [T, out]: y[row_i] += b_pool[row_slots[i]] @ xa[i]."""
    if groups.num_segments == 1:
        update = xa @ b_pool[int(groups.seg_slots[0])].t()
    elif _use_gather_form(groups):
        b = b_pool.index_select(0, groups.row_slots)  # [n, out, r]
        update = torch.bmm(b, xa.unsqueeze(2)).squeeze(2)
    else:
        b = b_pool.index_select(0, groups.seg_slots)  # [G, out, r]
        update = _segment_matmul(xa, b, groups)
    groups.scatter_add_rows(y, update)
