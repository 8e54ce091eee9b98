"""Vectorised PyTorch LoRA ops (the CPU serving path). See `lora_reference` for the meaning.

Three forms, the same result:
- padded form (the entries in use are nearly a contiguous range of the pool, the usual case):
  the rows are laid out as [entries, rows per entry] and one batched matmul reads that range
  of the pool in place. Decode is bound by reading adapter weights, and this reads each once;
- gather form (decode, about one token per adapter): each token's weights are gathered from
  the pool and one batched row-times-matrix product serves every token;
- segment form (prefill, many tokens per adapter): one matmul per active adapter over its
  contiguous rows, by `grouped_mm` in a single call.
Each rank class is served at its own rank: nothing is padded to the batch's largest rank.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .lora_groups import TokenGroups

# Gather form while a segment averages at most this many rows; segment form beyond.
GATHER_ROWS_PER_SEGMENT = 2


def form_of(groups: TokenGroups) -> str:
    """Which form serves these groups: "mm", "padded", "gather" or "segment"."""
    if groups.num_segments == 1:
        return "mm"
    if groups.padded is not None:
        return "padded"
    return "gather" if groups.num_rows <= GATHER_ROWS_PER_SEGMENT * groups.num_segments else "segment"


def _operand(rows: torch.Tensor, groups: TokenGroups, form: str) -> torch.Tensor:
    """The served rows [n, k] in the layout their form multiplies: the padded grid
    [entries, rows per entry, k] for the padded form, the rows themselves otherwise."""
    return groups.padded.pad(rows) if form == "padded" else rows


def _segment_matmul(x: torch.Tensor, w: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """x [n, k], w [G, m, k] -> [n, m]: each segment's rows times its own w[g]^T.

    `grouped_mm` needs 16-byte aligned strides; other shapes (say rank 2 in float32) take
    one matmul per segment instead."""
    if (x.shape[1] * x.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0:
        return F.grouped_mm(x.contiguous(), w.transpose(1, 2), offs=groups.seg_offsets)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, n in enumerate(groups.seg_lens.tolist()):
        out[start : start + n] = F.linear(x[start : start + n], w[g])
        start += n
    return out


def _per_row(x: torch.Tensor, pool: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """x [n, k], pool [S, m, k] -> [n, m]: row i times pool[row_entries[i]]^T.

    A row times a matrix (rather than the matrix times a column) is several times faster
    for these shapes on CPU."""
    w = pool.index_select(0, groups.row_entries)  # [n, m, k]
    return torch.bmm(x.unsqueeze(1), w.transpose(1, 2)).squeeze(1)


def _apply(operand: torch.Tensor, pool: torch.Tensor, groups: TokenGroups, form: str) -> torch.Tensor:
    """The same product as PEFT's nn.Linear layers, F.linear(x, w), for each served row's own w:
    operand (`_operand` of the rows [n, k]), pool [S, m, k] -> [n, m]."""
    if form == "mm":
        return torch.mm(operand, pool[groups.first_entry].t())
    if form == "padded":
        p = groups.padded
        w = pool[p.entry_lo : p.entry_lo + p.entries]  # a view: the entries in use are read in place
        return p.unpad(torch.bmm(operand, w.transpose(1, 2)))
    if form == "gather":
        return _per_row(operand, pool, groups)
    return _segment_matmul(operand, pool.index_select(0, groups.seg_entries), groups)


def _expand(xa: torch.Tensor, b_pool: torch.Tensor, groups: TokenGroups, y: torch.Tensor, form: str) -> None:
    if form == "mm" and groups.rows is None:  # one adapter over a range of rows: added in place
        y[groups.row_start : groups.row_start + groups.num_rows].addmm_(xa, b_pool[groups.first_entry].t())
    else:
        groups.scatter_add_rows(y, _apply(_operand(xa, groups, form), b_pool, groups, form))


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """x [T, in], a_pool [S, r, in] -> xa [n, r]: xa[i] = a_pool[row_entries[i]] @ x[row_i]."""
    form = form_of(groups)
    return _apply(_operand(groups.gather_rows(x), groups, form), a_pool, groups, form)


def lora_expand(xa: torch.Tensor, b_pool: torch.Tensor, groups: TokenGroups, y: torch.Tensor) -> None:
    """xa [n, r], b_pool [S, out, r], y [T, out]: y[row_i] += b_pool[row_entries[i]] @ xa[i]."""
    _expand(xa, b_pool, groups, y, form_of(groups))


def lora_shrink_fused(
    x: torch.Tensor, a_pools: Sequence[torch.Tensor], groups: Sequence[TokenGroups]
) -> list[torch.Tensor]:
    """Shrink for several problems (slices of a fused projection, rank classes) of one input.

    x [T, in], a_pools[p] [S_p, r_p, in] -> xas[p] [n_p, r_p]:
        xas[p] = lora_shrink(x, a_pools[p], groups[p])   for every problem p

    Problems given the same `TokenGroups` object (slices whose adapters share a layout, as
    `LoraBatch` builds them) gather and pad their rows of x once."""
    operands: dict[int, tuple[str, torch.Tensor]] = {}
    xas = []
    for a_pool, g in zip(a_pools, groups, strict=True):
        if id(g) not in operands:
            form = form_of(g)
            operands[id(g)] = form, _operand(g.gather_rows(x), g, form)
        form, operand = operands[id(g)]
        xas.append(_apply(operand, a_pool, g, form))
    return xas


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
        _expand(xa, b_pool, g, y[:, col : col + b_pool.shape[1]], form_of(g))


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out = weight + scale * (b @ a), computed in float32; weight/out [o, in], a [r, in], b [o, r].

    `out` is a separate buffer (it may be a row slice of a fused weight): the resident base
    weights are never modified, since in half precision merge-then-unmerge is not exact."""
    merged = torch.addmm(weight.float(), b.float(), a.float(), alpha=scale)
    out.copy_(merged)
