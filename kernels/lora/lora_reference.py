"""The naive reference for the LoRA ops: a plain loop over tokens. The test oracle; never optimised.

Pools hold adapters in PEFT's layout: A in `a_pool` [S, r, in], scale * B in `b_pool` [S, out, r].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .lora_groups import TokenGroups


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """Shrink each served token by its own adapter's A.

    x [T, in], a_pool [S, r, in] -> xa [n, r], where for the i-th served token:
        xa[i] = a_pool[groups.row_entries[i]] @ x[row_i]
    """
    rows = _served_rows(groups)
    out = torch.zeros(groups.num_rows, a_pool.shape[1], dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i] = a_pool[int(groups.row_entries[i])].float() @ x[row].float()
    return out.to(x.dtype)


def lora_expand(xa: torch.Tensor, b_pool: torch.Tensor, groups: TokenGroups, y: torch.Tensor) -> None:
    """Expand each served token by its own adapter's B (scale already folded in) into y.

    xa [n, r], b_pool [S, out, r], y [T, out] (a column slice of the fused output is fine):
        y[row_i] += b_pool[groups.row_entries[i]] @ xa[i]
    """
    rows = _served_rows(groups)
    for i, row in enumerate(rows):
        y[row] += (b_pool[int(groups.row_entries[i])].float() @ xa[i].float()).to(y.dtype)


def lora_shrink_fused(
    x: torch.Tensor, a_pools: Sequence[torch.Tensor], groups: Sequence[TokenGroups]
) -> list[torch.Tensor]:
    """Shrink for several problems (slices of a fused projection, rank classes) of one input.

    x [T, in], a_pools[p] [S_p, r_p, in] -> xas[p] [n_p, r_p]:
        xas[p] = lora_shrink(x, a_pools[p], groups[p])   for every problem p
    """
    return [lora_shrink(x, a_pool, g) for a_pool, g in zip(a_pools, groups, strict=True)]


def lora_expand_fused(
    xas: Sequence[torch.Tensor],
    b_pools: Sequence[torch.Tensor],
    groups: Sequence[TokenGroups],
    y: torch.Tensor,
    cols: Sequence[int],
) -> None:
    """Expand several problems into the column slices cols[p] .. cols[p] + out_p of y [T, out_total]:
        lora_expand(xas[p], b_pools[p], groups[p], y[:, cols[p] : cols[p] + out_p])   for every p
    """
    for xa, b_pool, g, col in zip(xas, b_pools, groups, cols, strict=True):
        lora_expand(xa, b_pool, g, y[:, col : col + b_pool.shape[1]])


def _served_rows(groups: TokenGroups) -> list[int]:
    if groups.rows is None:
        return list(range(groups.row_start, groups.row_start + groups.num_rows))
    return [int(r) for r in groups.rows]


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out[i, j] = weight[i, j] + scale * sum_k b[i, k] * a[k, j], element by element in float32."""
    rows, cols = weight.shape
    merged = weight.float().clone()
    for i in range(rows):
        for k in range(a.shape[0]):
            merged[i] += scale * float(b[i, k]) * a[k].float()
    out.copy_(merged)
