"""Triton LoRA ops (the GPU serving path). Same signatures and meaning as `lora_torch`/`lora_reference`.

Pools hold adapters in PEFT's layout: A in `a_pool` [S, r, in], scale * B in `b_pool` [S, out, r].
A *problem* is one pool pair with the `TokenGroups` of the rows it serves: one rank class of
one projection. `lora_shrink_fused`/`lora_expand_fused` serve several problems of one input in
ONE launch each: every slice of a fused projection (q/k/v, gate/up) and every rank class of
each, so a layer costs one shrink and one expand launch whatever its adapters' ranks.
`lora_shrink`/`lora_expand` are the one-problem case.

The grid is (block of a segment's rows, block of rank or output columns, segment of any
problem). A program reads its segment's problem, length, pool entry and first served row,
then its problem's row of a small int64 table (pool and xa addresses, rank, width, column
offset, strides), and returns at once when its block lies beyond the segment's rows, the
problem's own rank or the slice's own width: zero-length segments, one-row decode segments
and low-rank problems cost (almost) nothing. Batch rows are read through a served-row ->
batch-row index, so tokens without an adapter are never touched.

- shrink: each program computes a [BLOCK_M, 16] tile of xa (the rank tiled by 16, the
  smallest `tl.dot` tile), looping over `in` in chunks of SHRINK_BLOCK_K;
- expand: each program computes a [BLOCK_M, EXPAND_BLOCK_N] tile of the update, looping over
  the adapter's own rank in chunks of 16 (a rank-4 adapter pays for 16, never for a larger
  class), then adds it into y at its slice's columns through y's strides;
- merge: out = weight + scale * (b @ a) in tiles of [MERGE_BLOCK_M, MERGE_BLOCK_N].

Everything accumulates in float32, and `tl.dot(..., input_precision="ieee")` keeps float32
inputs in float32 on the GPU (not silently TF32). The kernels call only Triton builtins
(`tl.full`, not the `@jit` helper `tl.zeros`): a helper is interpreted only when Triton was
first imported with TRITON_INTERPRET=1, and a library may import Triton before we can set it.

On a CPU device Triton runs in its interpreter: `TRITON_INTERPRET=1` must be set before this
module is imported (`get_lora_ops("triton", "cpu")` does it); it serves float32/float16 only
and is slow, which is for tests, never for serving.

Host work per call: the first call with a given tuple of `TokenGroups` reads every problem's
longest segment (for the grid), largest pool entry and batch row (checked against the tensors,
so a bad index raises instead of reading out of bounds) in one transfer, memoised for that
tuple: a step's groups are shared by every layer, so this happens once per step and layer
kind, not per layer. The per-problem table is cached by content (pool addresses do not move
between steps), so it is copied to the device once per layer and batch composition.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .lora_groups import TokenGroups

# Block sizes: fixed (tests rely on them; no autotuning). tl.dot needs every tile side >= 16.
SHRINK_BLOCK_M = 16  # served rows per program
SHRINK_BLOCK_R = 16  # rank columns of xa per program (the rank is tiled, never padded to a class)
SHRINK_BLOCK_K = 64  # chunk of in_features per loop step
EXPAND_BLOCK_M = 16  # served rows per program
EXPAND_BLOCK_N = 64  # output columns per program
EXPAND_BLOCK_R = 16  # chunk of the adapter's rank per loop step
MERGE_BLOCK_M = 32  # weight rows per program
MERGE_BLOCK_N = 64  # weight columns per program
MERGE_BLOCK_R = 16  # chunk of the rank per loop step
SHRINK_TABLE = 8  # int64 words per problem in the shrink kernel's table (7 used)
EXPAND_TABLE = 12  # int64 words per problem in the expand kernel's table (11 used)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# kernels ----------------------------------------------------------------------------------


@triton.jit
def _shrink_kernel(
    x_ptr,  # x [T, in]
    table_ptr,  # [P, SHRINK_TABLE] int64 per problem: A pool address, xa address, rank, first served row
    #             in rows_ptr, strides of the A pool (entry, rank, in)
    rows_ptr,  # [sum n_p] int64: batch row of each served row, problem after problem
    seg_problem_ptr, seg_lens_ptr, seg_starts_ptr, seg_slots_ptr,  # [G] int64: problem, rows,
    #                                                 first served row within the problem, pool entry
    K,  # in_features
    stride_xt, stride_xk,
    TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # block of the segment's rows
    pid_r = tl.program_id(1)  # block of rank columns
    seg = tl.program_id(2)
    seg_len = tl.load(seg_lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:  # beyond this segment (zero-length, short decode segment)
        return
    entry = table_ptr + tl.load(seg_problem_ptr + seg) * TABLE
    R = tl.load(entry + 2)
    if pid_r * BLOCK_R >= R:  # beyond this problem's own rank
        return
    a_ptr = tl.load(entry + 0).to(tl.pointer_type(x_ptr.dtype.element_ty))
    xa_ptr = tl.load(entry + 1).to(tl.pointer_type(x_ptr.dtype.element_ty))
    row_base = tl.load(entry + 3)
    stride_as = tl.load(entry + 4)
    stride_ar = tl.load(entry + 5)
    stride_ak = tl.load(entry + 6)
    seg_start = tl.load(seg_starts_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] row within the segment
    mask_m = offs_m < seg_len
    served = seg_start + offs_m  # [BM] row of this problem's xa
    batch_rows = tl.load(rows_ptr + row_base + served, mask=mask_m, other=0)  # [BM] row of x
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    mask_r = offs_r < R

    x_rows = x_ptr + batch_rows[:, None] * stride_xt  # [BM, 1]
    a_cols = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar  # [1, BR]
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < K
        x_tile = tl.load(x_rows + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        a_tile = tl.load(a_cols + offs_k[:, None] * stride_ak,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # [BK, BR] = A[e]^T chunk
        acc = tl.dot(x_tile, a_tile, acc, input_precision="ieee")

    out = xa_ptr + served[:, None] * R + offs_r[None, :]  # xa [n_p, R], contiguous
    tl.store(out, acc.to(x_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    y_ptr,  # y [T, out_total] (any strides)
    table_ptr,  # [P, EXPAND_TABLE] int64 per problem: xa address, B pool address, rank, out, first
    #             column in y, first served row in rows_ptr, strides of xa (row, rank) and of the
    #             B pool (entry, out, rank)
    rows_ptr,  # [sum n_p] int64: batch row of each served row, problem after problem
    seg_problem_ptr, seg_lens_ptr, seg_starts_ptr, seg_slots_ptr,  # [G] int64, as for shrink
    stride_yt, stride_yn,
    TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)  # block of the segment's rows
    pid_n = tl.program_id(1)  # block of output columns
    seg = tl.program_id(2)
    seg_len = tl.load(seg_lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    entry = table_ptr + tl.load(seg_problem_ptr + seg) * TABLE
    N = tl.load(entry + 3)
    if pid_n * BLOCK_N >= N:  # beyond this slice's own width
        return
    xa_ptr = tl.load(entry + 0).to(tl.pointer_type(y_ptr.dtype.element_ty))
    b_ptr = tl.load(entry + 1).to(tl.pointer_type(y_ptr.dtype.element_ty))
    R = tl.load(entry + 2)
    col = tl.load(entry + 4)
    row_base = tl.load(entry + 5)
    stride_xn = tl.load(entry + 6)
    stride_xr = tl.load(entry + 7)
    stride_bs = tl.load(entry + 8)
    stride_bn = tl.load(entry + 9)
    stride_br = tl.load(entry + 10)
    seg_start = tl.load(seg_starts_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    mask_m = offs_m < seg_len
    served = seg_start + offs_m  # [BM] row of this problem's xa
    batch_rows = tl.load(rows_ptr + row_base + served, mask=mask_m, other=0)  # [BM] row of y
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] column within the slice
    mask_n = offs_n < N

    xa_rows = xa_ptr + served[:, None] * stride_xn  # [BM, 1]
    b_cols = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn  # [1, BN]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, R, BLOCK_R):  # the adapter's own rank, 16 at a time
        offs_k = k + tl.arange(0, BLOCK_R)  # [BR]
        mask_k = offs_k < R
        xa_tile = tl.load(xa_rows + offs_k[None, :] * stride_xr,
                          mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BR]
        b_tile = tl.load(b_cols + offs_k[:, None] * stride_br,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BR, BN] = B[e]^T chunk
        acc = tl.dot(xa_tile, b_tile, acc, input_precision="ieee")

    y_tile_ptr = y_ptr + batch_rows[:, None] * stride_yt + (col + offs_n)[None, :] * stride_yn  # [BM, BN]
    mask = mask_m[:, None] & mask_n[None, :]
    y_tile = tl.load(y_tile_ptr, mask=mask, other=0.0)
    tl.store(y_tile_ptr, (y_tile.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,  # weight [o, in], a [r, in], b [o, r], out [o, in]
    M, N, R, scale,  # o, in, r, the LoRA scale
    stride_wm, stride_wn,
    stride_ar, stride_an,
    stride_bm, stride_br,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, R, BLOCK_R):
        offs_k = k + tl.arange(0, BLOCK_R)  # [BR]
        mask_k = offs_k < R
        b_tile = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_k[None, :] * stride_br,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BR]
        a_tile = tl.load(a_ptr + offs_k[:, None] * stride_ar + offs_n[None, :] * stride_an,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BR, BN]
        acc = tl.dot(b_tile, a_tile, acc, input_precision="ieee")

    mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn, mask=mask, other=0.0)
    merged = w.to(tl.float32) + scale * acc
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             merged.to(out_ptr.dtype.element_ty), mask=mask)


# Whether the kernels above were defined for Triton's interpreter (TRITON_INTERPRET=1 at import).
_INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"


# ops --------------------------------------------------------------------------------------


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """Shrink each served token by its own adapter's A, in one launch for every segment.

    x [T, in], a_pool [S, r, in] -> xa [n, r] (x's dtype), rows in served order:

        xa = empty(n, r)
        for i, row in enumerate(served rows):        # groups.rows, or row_start .. row_start + n
            xa[i] = a_pool[groups.row_slots[i]] @ x[row]    # accumulated in float32
        return xa
    """
    return _shrink(x, [a_pool], [groups], ["a_pool"])[0]


def lora_expand(xa: torch.Tensor, b_pool: torch.Tensor, groups: TokenGroups, y: torch.Tensor) -> None:
    """Expand each served token by its own adapter's B (scale folded in), adding into y in place.

    xa [n, r], b_pool [S, out, r], y [T, out] (any strides: a column slice of a fused output
    is fine); rows of y that are not served are never read or written:

        for i, row in enumerate(served rows):        # groups.rows, or row_start .. row_start + n
            y[row] += b_pool[groups.row_slots[i]] @ xa[i]   # float32 sum, one rounding to y's dtype
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
    meta = _launch_meta(groups, x.device)
    for p, (name, a_pool) in enumerate(zip(names, a_pools)):
        _check_indices(meta, p, groups[p], num_batch_rows=x.shape[0], batch_name="x", pool_name=name,
                       pool_entries=a_pool.shape[0])

    ranks = [a.shape[1] for a in a_pools]
    sizes = [g.num_rows * r for g, r in zip(groups, ranks)]
    flat = torch.empty(sum(sizes), dtype=x.dtype, device=x.device)
    xas = [part.view(g.num_rows, r) for part, g, r in zip(flat.split(sizes), groups, ranks)]  # [n_p, r_p]
    if not sizes or max(sizes) == 0:
        return xas
    table = _problem_table(x.device, [
        (a.data_ptr(), xa.data_ptr(), r, meta.row_bases[p], a.stride(0), a.stride(1), a.stride(2), 0)
        for p, (a, xa, r) in enumerate(zip(a_pools, xas, ranks))
    ])
    grid = (triton.cdiv(meta.max_seg_len, SHRINK_BLOCK_M), triton.cdiv(max(ranks), SHRINK_BLOCK_R),
            meta.num_segments)
    _shrink_kernel[grid](
        x, table, meta.rows, meta.seg_problem, meta.seg_lens, meta.seg_starts, meta.seg_slots,
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
    meta = _launch_meta(groups, y.device)
    for p, (b_name, b_pool) in enumerate(zip(b_names, b_pools)):
        _check_indices(meta, p, groups[p], num_batch_rows=y.shape[0], batch_name="y", pool_name=b_name,
                       pool_entries=b_pool.shape[0])

    work = [g.num_rows * b.shape[1] * b.shape[2] for g, b in zip(groups, b_pools)]
    if not work or max(work) == 0:
        return
    table = _problem_table(y.device, [
        (xa.data_ptr(), b.data_ptr(), b.shape[2], b.shape[1], col, meta.row_bases[p], xa.stride(0),
         xa.stride(1), b.stride(0), b.stride(1), b.stride(2), 0)
        for p, (xa, b, col) in enumerate(zip(xas, b_pools, cols))
    ])
    grid = (triton.cdiv(meta.max_seg_len, EXPAND_BLOCK_M), triton.cdiv(max(b.shape[1] for b in b_pools),
                                                                       EXPAND_BLOCK_N), meta.num_segments)
    _expand_kernel[grid](
        y, table, meta.rows, meta.seg_problem, meta.seg_lens, meta.seg_starts, meta.seg_slots,
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
    _merge_kernel[grid](
        weight, a, b, out,
        rows, cols, rank, float(scale),
        weight.stride(0), weight.stride(1),
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=MERGE_BLOCK_M, BLOCK_N=MERGE_BLOCK_N, BLOCK_R=MERGE_BLOCK_R,
    )


# launch metadata --------------------------------------------------------------------------


class _Meta:
    """What a launch needs from a tuple of TokenGroups (one per problem), on the device, plus
    host-side bounds per problem. Segments of every problem are concatenated, problem after problem."""

    __slots__ = ("rows", "seg_problem", "seg_lens", "seg_starts", "seg_slots", "num_segments", "max_seg_len",
                 "row_bases", "max_slots", "max_rows")

    def __init__(self, groups: Sequence[TokenGroups], device: torch.device) -> None:
        rows, seg_problem, seg_lens, seg_slots, seg_starts = [], [], [], [], []
        self.row_bases: list[int] = []  # first entry of each problem's rows in `rows`
        base = 0
        for p, g in enumerate(groups):
            n = g.num_rows
            if g.rows is None:  # contiguous served rows: index them through an arange
                rows.append(torch.arange(g.row_start, g.row_start + n, dtype=torch.long, device=device))
            else:
                rows.append(g.rows.to(device=device, dtype=torch.long))
            if rows[-1].numel() != n:
                raise ValueError(f"groups[{p}].rows has {rows[-1].numel()} entries but num_rows={n}")
            lens = g.seg_lens.to(device=device, dtype=torch.long)
            seg_lens.append(lens)
            seg_starts.append(torch.cumsum(lens, 0) - lens)  # first served row within the problem
            seg_slots.append(g.seg_slots.to(device=device, dtype=torch.long))
            seg_problem.append(torch.full((g.num_segments,), p, dtype=torch.long, device=device))
            self.row_bases.append(base)
            base += n
        cat = (lambda ts: torch.cat(ts).contiguous()) if groups else (
            lambda ts: torch.empty(0, dtype=torch.long, device=device))
        self.rows, self.seg_problem, self.seg_lens = cat(rows), cat(seg_problem), cat(seg_lens)  # [sum n], [G], [G]
        self.seg_starts, self.seg_slots = cat(seg_starts), cat(seg_slots)  # [G], [G]
        self.num_segments = int(self.seg_lens.shape[0])
        self.max_seg_len = 0
        self.max_slots, self.max_rows = [-1] * len(groups), [-1] * len(groups)
        self._bounds(groups, rows, seg_lens, seg_slots)

    def _bounds(self, groups, rows, seg_lens, seg_slots) -> None:
        """The single host synchronisation: every problem's bounds, read in one transfer."""
        stats = []
        for g, r, lens, slots in zip(groups, rows, seg_lens, seg_slots):
            if g.num_segments:
                stats.append(torch.stack([lens.max(), lens.sum(), lens.min(), slots.max(), slots.min()]))
                if g.num_rows:
                    stats.append(torch.stack([r.max(), r.min()]))
        values = torch.cat(stats).tolist() if stats else []
        for p, g in enumerate(groups):
            if not g.num_segments:
                if g.num_rows:
                    raise ValueError(f"groups[{p}] have no segment but num_rows={g.num_rows}")
                continue
            max_len, total, min_len, self.max_slots[p], min_slot = values[:5]
            values = values[5:]
            min_row = 0
            if g.num_rows:
                self.max_rows[p], min_row = values[:2]
                values = values[2:]
            if min_len < 0 or min_slot < 0 or min_row < 0:
                raise ValueError(f"groups hold a negative length, pool entry or row: seg_lens "
                                 f"{g.seg_lens.tolist()}, seg_slots {g.seg_slots.tolist()}")
            if total != g.num_rows:
                raise ValueError(f"groups are inconsistent: seg_lens sum to {total} but num_rows={g.num_rows}")
            self.max_seg_len = max(self.max_seg_len, max_len)


_META: dict[tuple[int, ...], _Meta] = {}


def _launch_meta(groups: Sequence[TokenGroups], device: torch.device) -> _Meta:
    """The launch metadata of this tuple of groups on `device`, built once per tuple (see the module doc)."""
    for p, g in enumerate(groups):
        for name in ("rows", "seg_lens", "seg_slots"):
            t = getattr(g, name)
            if t is not None and t.device != device:
                raise ValueError(f"groups[{p}].{name} is on {t.device} but the tensors are on {device}: build "
                                 f"the TokenGroups with device={str(device)!r}")
    key = tuple(id(g) for g in groups)  # groups are frozen; the entry leaves with any of its objects
    meta = _META.get(key)
    if meta is None:
        meta = _Meta(groups, device)
        for g in set(groups):
            weakref.finalize(g, _META.pop, key, None)
        _META[key] = meta
    return meta


_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 4096


def _problem_table(device: torch.device, rows: list[tuple[int, ...]]) -> torch.Tensor:
    """The per-problem table [P, width] int64 on `device`, cached by content: pool addresses are
    stable between steps, so a layer's table is copied to the device once, not every step."""
    key = (device, tuple(rows))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = torch.tensor(rows, dtype=torch.long).to(device)
        _TABLES[key] = table
    return table


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
        if not _INTERPRETED:
            raise ValueError("the Triton LoRA ops got CPU tensors but Triton is not in its interpreter: set "
                             "TRITON_INTERPRET=1 before loraplex.kernels.lora_triton is first imported, or "
                             "use the torch kernels on CPU")
        for name, t in named:
            if t.dtype == torch.bfloat16:
                raise ValueError(f"{name} is bfloat16 on CPU: Triton's interpreter has no bfloat16; use "
                                 f"float32/float16 or the torch kernels")


def _check_problems(count: int, num_groups: int, name: str) -> None:
    if count != num_groups:
        raise ValueError(f"{name} has {count} entries but groups has {num_groups}: one per problem")


def _check_indices(meta: _Meta, p: int, groups: TokenGroups, num_batch_rows: int, batch_name: str,
                   pool_name: str, pool_entries: int) -> None:
    if meta.max_slots[p] >= pool_entries:
        raise ValueError(f"groups use pool entry {meta.max_slots[p]} but {pool_name} has {pool_entries} entries "
                         f"(seg_slots {groups.seg_slots.tolist()})")
    if meta.max_rows[p] >= num_batch_rows:
        raise ValueError(f"groups serve batch row {meta.max_rows[p]} but {batch_name} has {num_batch_rows} rows")
