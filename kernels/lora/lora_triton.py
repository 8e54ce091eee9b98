"""Triton LoRA ops (the GPU serving path). Same signatures and meaning as `lora_torch`/`lora_reference`.

Pools hold adapters in PEFT's layout: A in `a_pool` [S, r, in], scale * B in `b_pool` [S, out, r].
A *problem* is one pool pair with the `TokenGroups` of the rows it serves: one rank class of
one projection. `lora_shrink_fused`/`lora_expand_fused` serve several problems of one input in
ONE launch each: every slice of a fused projection (q/k/v, gate/up) and every rank class of
each, so a layer costs one shrink and one expand launch whatever its adapters' ranks.
`lora_shrink`/`lora_expand` are the one-problem case.

The kernels and their grid are in `triton_kernels`; the per-step launch metadata (segments,
bounds, the per-problem table) in `triton_launch`. This module checks the operands, builds each
launch's problem table and launches.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from .lora_groups import TokenGroups
from .triton_kernels import (EXPAND_BLOCK_M, EXPAND_BLOCK_N, EXPAND_BLOCK_R, EXPAND_TABLE, INTERPRETED,
                             MERGE_BLOCK_M, MERGE_BLOCK_N, MERGE_BLOCK_R, SHRINK_BLOCK_K, SHRINK_BLOCK_M,
                             SHRINK_BLOCK_R, SHRINK_TABLE, expand_kernel, merge_kernel, shrink_kernel)
from .triton_launch import LaunchMeta, launch_meta, problem_table

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ops --------------------------------------------------------------------------------------


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """Shrink each served token by its own adapter's A, in one launch for every segment.

    x [T, in], a_pool [S, r, in] -> xa [n, r] (x's dtype), rows in served order:

        xa = empty(n, r)
        for i, row in enumerate(served rows):        # groups.rows, or row_start .. row_start + n
            xa[i] = a_pool[groups.row_entries[i]] @ x[row]    # accumulated in float32
        return xa
    """
    return _shrink(x, [a_pool], [groups], ["a_pool"])[0]


def lora_expand(xa: torch.Tensor, b_pool: torch.Tensor, groups: TokenGroups, y: torch.Tensor) -> None:
    """Expand each served token by its own adapter's B (scale folded in), adding into y in place.

    xa [n, r], b_pool [S, out, r], y [T, out] (any strides: a column slice of a fused output
    is fine); rows of y that are not served are never read or written:

        for i, row in enumerate(served rows):        # groups.rows, or row_start .. row_start + n
            y[row] += b_pool[groups.row_entries[i]] @ xa[i]   # float32 sum, one rounding to y's dtype
    """
    _check_tensor("b_pool", b_pool, 3, "[S, out, r]")
    _check_tensor("y", y, 2, "[T, out]")
    if y.shape[1] != b_pool.shape[1]:
        raise ValueError(f"y [T, out] has out={y.shape[1]} (shape {tuple(y.shape)}) but b_pool [S, out, r] "
                         f"has out={b_pool.shape[1]} (shape {tuple(b_pool.shape)}): pass the column slice "
                         f"of y this projection writes")
    _expand([xa], [b_pool], [groups], y, [0], ["xa"], ["b_pool"])


def lora_shrink_fused(
    x: torch.Tensor, a_pools: Sequence[torch.Tensor], groups: Sequence[TokenGroups]
) -> list[torch.Tensor]:
    """Shrink for several problems of one input in ONE launch: every slice of a fused projection
    (q/k/v, gate/up) and every rank class of each. Problem p is (a_pools[p], groups[p]).

    x [T, in], a_pools[p] [S_p, r_p, in] -> xas[p] [n_p, r_p]:

        for p in problems:
            xas[p] = lora_shrink(x, a_pools[p], groups[p])

    The grid is (row blocks of the longest segment, rank blocks of the largest rank, all
    segments of all problems); a program beyond its own segment's rows or its own problem's
    rank returns at once, so a rank-4 problem pays for one 16-wide tile.
    """
    return _shrink(x, a_pools, groups, [f"a_pools[{p}]" for p in range(len(a_pools))])


def lora_expand_fused(
    xas: Sequence[torch.Tensor],
    b_pools: Sequence[torch.Tensor],
    groups: Sequence[TokenGroups],
    y: torch.Tensor,
    cols: Sequence[int],
) -> None:
    """Expand several problems into one output in ONE launch; problem p adds into the columns
    cols[p] .. cols[p] + out_p of y. Problems sharing columns must serve disjoint rows (a row has
    one adapter per projection), so no two programs write the same element.

    xas[p] [n_p, r_p], b_pools[p] [S_p, out_p, r_p], y [T, out_total] (any strides):

        for p in problems:
            lora_expand(xas[p], b_pools[p], groups[p], y[:, cols[p] : cols[p] + out_p])
    """
    _check_tensor("y", y, 2, "[T, out]")
    for p, (b_pool, col) in enumerate(zip(b_pools, cols)):
        _check_tensor(f"b_pools[{p}]", b_pool, 3, "[S, out, r]")
        out_f = b_pool.shape[1]
        if not 0 <= col <= col + out_f <= y.shape[1]:
            raise ValueError(f"cols[{p}]={col} with b_pools[{p}] out={out_f} reaches past y [T, out] with "
                             f"out={y.shape[1]} (shape {tuple(y.shape)})")
    _expand(xas, b_pools, groups, y, cols, [f"xas[{p}]" for p in range(len(xas))],
            [f"b_pools[{p}]" for p in range(len(b_pools))])


def _shrink(x: torch.Tensor, a_pools: Sequence[torch.Tensor], groups: Sequence[TokenGroups],
            names: list[str]) -> list[torch.Tensor]:
    _check_problems(len(a_pools), len(groups), "a_pools")
    _check_tensor("x", x, 2, "[T, in]")
    for name, a_pool in zip(names, a_pools):
        _check_tensor(name, a_pool, 3, "[S, r, in]")
        _check_same_dtype(("x", x), (name, a_pool))
        if x.shape[1] != a_pool.shape[2]:
            raise ValueError(f"x [T, in] has in={x.shape[1]} (shape {tuple(x.shape)}) but {name} [S, r, in] "
                             f"has in={a_pool.shape[2]} (shape {tuple(a_pool.shape)}): the pool belongs to "
                             f"another projection")
        _check_devices(("x", x), (name, a_pool))
    meta = launch_meta(groups, x.device)
    for p, (name, a_pool) in enumerate(zip(names, a_pools)):
        _check_indices(meta, p, groups[p], num_batch_rows=x.shape[0], batch_name="x", pool_name=name,
                       pool_entries=a_pool.shape[0])

    ranks = [a.shape[1] for a in a_pools]
    sizes = [g.num_rows * r for g, r in zip(groups, ranks)]
    flat = torch.empty(sum(sizes), dtype=x.dtype, device=x.device)
    xas = [part.view(g.num_rows, r) for part, g, r in zip(flat.split(sizes), groups, ranks)]  # [n_p, r_p]
    if not sizes or max(sizes) == 0:
        return xas
    table = problem_table(x.device, [
        (a.data_ptr(), xa.data_ptr(), r, meta.row_bases[p], a.stride(0), a.stride(1), a.stride(2), 0)
        for p, (a, xa, r) in enumerate(zip(a_pools, xas, ranks))
    ])
    grid = (triton.cdiv(meta.max_seg_len, SHRINK_BLOCK_M), triton.cdiv(max(ranks), SHRINK_BLOCK_R),
            meta.num_segments)
    shrink_kernel[grid](
        x, table, meta.rows, meta.seg_problem, meta.seg_lens, meta.seg_starts, meta.seg_entries,
        x.shape[1], x.stride(0), x.stride(1),
        TABLE=SHRINK_TABLE, BLOCK_M=SHRINK_BLOCK_M, BLOCK_R=SHRINK_BLOCK_R, BLOCK_K=SHRINK_BLOCK_K,
    )
    return xas


def _expand(xas: Sequence[torch.Tensor], b_pools: Sequence[torch.Tensor], groups: Sequence[TokenGroups],
            y: torch.Tensor, cols: Sequence[int], xa_names: list[str], b_names: list[str]) -> None:
    _check_problems(len(xas), len(groups), "xas")
    _check_problems(len(b_pools), len(groups), "b_pools")
    _check_problems(len(cols), len(groups), "cols")
    for xa_name, xa, b_name, b_pool, g in zip(xa_names, xas, b_names, b_pools, groups):
        _check_tensor(xa_name, xa, 2, "[n, r]")
        _check_tensor(b_name, b_pool, 3, "[S, out, r]")
        _check_same_dtype((xa_name, xa), (b_name, b_pool), ("y", y))
        if xa.shape[1] != b_pool.shape[2]:
            raise ValueError(f"rank classes differ: {xa_name} [n, r] has r={xa.shape[1]} (shape {tuple(xa.shape)}) "
                             f"but {b_name} [S, out, r] has r={b_pool.shape[2]} (shape {tuple(b_pool.shape)}); "
                             f"expand with the B pool of the rank class that produced {xa_name}")
        if xa.shape[0] != g.num_rows:
            raise ValueError(f"{xa_name} [n, r] has {xa.shape[0]} rows (shape {tuple(xa.shape)}) but groups serve "
                             f"num_rows={g.num_rows}: {xa_name} must come from lora_shrink with the same groups")
        _check_devices((xa_name, xa), (b_name, b_pool), ("y", y))
    meta = launch_meta(groups, y.device)
    for p, (b_name, b_pool) in enumerate(zip(b_names, b_pools)):
        _check_indices(meta, p, groups[p], num_batch_rows=y.shape[0], batch_name="y", pool_name=b_name,
                       pool_entries=b_pool.shape[0])

    work = [g.num_rows * b.shape[1] * b.shape[2] for g, b in zip(groups, b_pools)]
    if not work or max(work) == 0:
        return
    table = problem_table(y.device, [
        (xa.data_ptr(), b.data_ptr(), b.shape[2], b.shape[1], col, meta.row_bases[p], xa.stride(0),
         xa.stride(1), b.stride(0), b.stride(1), b.stride(2), 0)
        for p, (xa, b, col) in enumerate(zip(xas, b_pools, cols))
    ])
    grid = (triton.cdiv(meta.max_seg_len, EXPAND_BLOCK_M), triton.cdiv(max(b.shape[1] for b in b_pools),
                                                                       EXPAND_BLOCK_N), meta.num_segments)
    expand_kernel[grid](
        y, table, meta.rows, meta.seg_problem, meta.seg_lens, meta.seg_starts, meta.seg_entries,
        y.stride(0), y.stride(1),
        TABLE=EXPAND_TABLE, BLOCK_M=EXPAND_BLOCK_M, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=EXPAND_BLOCK_R,
    )


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Write weight + scale * (b @ a) into the separate buffer `out`, in one launch.

    weight [o, in], a [r, in], b [o, r], out [o, in] (any strides: a row slice of a fused
    weight is fine); weight is only read:

        for i, j in every (row, column):
            out[i, j] = weight[i, j] + scale * sum_k b[i, k] * a[k, j]   # float32, one rounding
    """
    _check_tensor("weight", weight, 2, "[o, in]")
    _check_tensor("a", a, 2, "[r, in]")
    _check_tensor("b", b, 2, "[o, r]")
    _check_tensor("out", out, 2, "[o, in]")
    _check_same_dtype(("a", a), ("b", b))
    if out.shape != weight.shape:
        raise ValueError(f"out {tuple(out.shape)} must have weight's shape {tuple(weight.shape)} [o, in]")
    if a.shape[1] != weight.shape[1]:
        raise ValueError(f"a [r, in] has in={a.shape[1]} (shape {tuple(a.shape)}) but weight [o, in] has "
                         f"in={weight.shape[1]} (shape {tuple(weight.shape)})")
    if b.shape[0] != weight.shape[0]:
        raise ValueError(f"b [o, r] has o={b.shape[0]} (shape {tuple(b.shape)}) but weight [o, in] has "
                         f"o={weight.shape[0]} (shape {tuple(weight.shape)})")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"ranks differ: b [o, r] has r={b.shape[1]} (shape {tuple(b.shape)}) but a [r, in] "
                         f"has r={a.shape[0]} (shape {tuple(a.shape)})")
    _check_devices(("weight", weight), ("a", a), ("b", b), ("out", out))

    rows, cols, rank = weight.shape[0], weight.shape[1], a.shape[0]
    if rows == 0 or cols == 0:
        return
    grid = (triton.cdiv(rows, MERGE_BLOCK_M), triton.cdiv(cols, MERGE_BLOCK_N))
    merge_kernel[grid](
        weight, a, b, out,
        rows, cols, rank, float(scale),
        weight.stride(0), weight.stride(1),
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=MERGE_BLOCK_M, BLOCK_N=MERGE_BLOCK_N, BLOCK_R=MERGE_BLOCK_R,
    )


# checks -----------------------------------------------------------------------------------


def _check_tensor(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} {layout} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the Triton LoRA ops take float32, float16 or bfloat16")


def _check_same_dtype(*named: tuple[str, torch.Tensor]) -> None:
    (first_name, first), *rest = named
    for name, t in rest:
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}: "
                             f"{', '.join(n for n, _ in named)} must share one dtype")


def _check_devices(*named: tuple[str, torch.Tensor]) -> None:
    (first_name, first), *rest = named
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    if first.device.type == "cpu":
        if not INTERPRETED:
            raise ValueError("the Triton LoRA ops got CPU tensors but Triton is not in its interpreter: set "
                             "TRITON_INTERPRET=1 before loraplex.kernels.lora_triton is first imported, or "
                             "use the torch kernels on CPU")
        for name, t in named:
            if t.dtype == torch.bfloat16:
                raise ValueError(f"{name} is bfloat16 on CPU: Triton's interpreter has no bfloat16; use "
                                 f"float32/float16 or the torch kernels")


def _check_problems(count: int, num_groups: int, name: str) -> None:
    if count != num_groups:
        raise ValueError(f"{name} has {count} items but groups has {num_groups}: one per problem")


def _check_indices(meta: LaunchMeta, p: int, groups: TokenGroups, num_batch_rows: int, batch_name: str,
                   pool_name: str, pool_entries: int) -> None:
    if meta.max_entries[p] >= pool_entries:
        raise ValueError(f"groups use pool entry {meta.max_entries[p]} but {pool_name} has {pool_entries} entries "
                         f"(seg_entries {groups.seg_entries.tolist()})")
    if meta.max_rows[p] >= num_batch_rows:
        raise ValueError(f"groups serve batch row {meta.max_rows[p]} but {batch_name} has {num_batch_rows} rows")
