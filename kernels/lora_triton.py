"""Triton LoRA ops (the GPU serving path). Same signatures and meaning as `lora_torch`/`lora_reference`.

Pools hold adapters in PEFT's layout: A in `a_pool` [S, r, in], scale * B in `b_pool` [S, out, r];
one call serves one rank class (one pair of pools) for every segment of a `TokenGroups`.

Each op is ONE kernel launch serving every segment. The grid is
(block of a segment's rows, block of output columns, segment): a program reads its segment's
length, pool entry and first served row, and returns at once when its row block lies beyond
the segment's length, so zero-length segments and one-row decode segments cost (almost)
nothing. Batch rows are read through a served-row -> batch-row index (an arange when
`groups.rows` is None), so tokens without an adapter are never touched.

- shrink: each program computes a [BLOCK_M, 16] tile of xa (the rank tiled by 16, the
  smallest `tl.dot` tile), looping over `in` in chunks of SHRINK_BLOCK_K;
- expand: each program computes a [BLOCK_M, EXPAND_BLOCK_N] tile of the update, looping over
  the adapter's own rank in chunks of 16 (a rank-4 adapter pays for 16, never for a larger
  class), then adds it into y through y's strides (a column slice of a wider output is fine);
- merge: out = weight + scale * (b @ a) in tiles of [MERGE_BLOCK_M, MERGE_BLOCK_N].

Everything accumulates in float32, and `tl.dot(..., input_precision="ieee")` keeps float32
inputs in float32 on the GPU (not silently TF32).

On a CPU device Triton runs in its interpreter: `TRITON_INTERPRET=1` must be set before this
module is imported (`get_lora_ops("triton", "cpu")` does it); it serves float32/float16 only
and is slow, which is for tests, never for serving.

The one host synchronisation: the first call with a given `TokenGroups` reads its longest
segment (for the grid), its largest pool entry and batch row (checked against the tensors, so
a bad index raises instead of reading out of bounds), memoised for that object: a step's
groups are shared by every layer, so this happens once per step and layout, not per layer.
"""
from __future__ import annotations

import weakref

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

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# kernels ----------------------------------------------------------------------------------


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, xa_ptr,  # x [T, in], a_pool [S, r, in], xa [n, r]
    rows_ptr,  # [n] int64: batch row of each served row
    seg_lens_ptr, seg_starts_ptr, seg_slots_ptr,  # [G] int64: rows, first served row, pool entry
    K, R,  # in_features, rank
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_on, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # block of the segment's rows
    pid_r = tl.program_id(1)  # block of rank columns
    seg = tl.program_id(2)
    seg_len = tl.load(seg_lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:  # beyond this segment (zero-length, short decode segment)
        return
    seg_start = tl.load(seg_starts_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] row within the segment
    mask_m = offs_m < seg_len
    served = seg_start + offs_m  # [BM] row of xa
    batch_rows = tl.load(rows_ptr + served, mask=mask_m, other=0)  # [BM] row of x
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    mask_r = offs_r < R

    x_rows = x_ptr + batch_rows[:, None] * stride_xt  # [BM, 1]
    a_cols = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar  # [1, BR]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < K
        x_tile = tl.load(x_rows + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        a_tile = tl.load(a_cols + offs_k[:, None] * stride_ak,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # [BK, BR] = A[e]^T chunk
        acc = tl.dot(x_tile, a_tile, acc, input_precision="ieee")

    out = xa_ptr + served[:, None] * stride_on + offs_r[None, :] * stride_or
    tl.store(out, acc.to(xa_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    xa_ptr, b_ptr, y_ptr,  # xa [n, r], b_pool [S, out, r], y [T, out] (any strides)
    rows_ptr,  # [n] int64: batch row of each served row
    seg_lens_ptr, seg_starts_ptr, seg_slots_ptr,  # [G] int64
    N, R,  # out_features, rank
    stride_xn, stride_xr,
    stride_bs, stride_bn, stride_br,
    stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)  # block of the segment's rows
    pid_n = tl.program_id(1)  # block of output columns
    seg = tl.program_id(2)
    seg_len = tl.load(seg_lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    seg_start = tl.load(seg_starts_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    mask_m = offs_m < seg_len
    served = seg_start + offs_m  # [BM] row of xa
    batch_rows = tl.load(rows_ptr + served, mask=mask_m, other=0)  # [BM] row of y
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < N

    xa_rows = xa_ptr + served[:, None] * stride_xn  # [BM, 1]
    b_cols = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn  # [1, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, R, BLOCK_R):  # the adapter's own rank, 16 at a time
        offs_k = k + tl.arange(0, BLOCK_R)  # [BR]
        mask_k = offs_k < R
        xa_tile = tl.load(xa_rows + offs_k[None, :] * stride_xr,
                          mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BR]
        b_tile = tl.load(b_cols + offs_k[:, None] * stride_br,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BR, BN] = B[e]^T chunk
        acc = tl.dot(xa_tile, b_tile, acc, input_precision="ieee")

    y_tile_ptr = y_ptr + batch_rows[:, None] * stride_yt + offs_n[None, :] * stride_yn  # [BM, BN]
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
    _check_tensor("x", x, 2, "[T, in]")
    _check_tensor("a_pool", a_pool, 3, "[S, r, in]")
    _check_same_dtype(("x", x), ("a_pool", a_pool))
    if x.shape[1] != a_pool.shape[2]:
        raise ValueError(f"x [T, in] has in={x.shape[1]} (shape {tuple(x.shape)}) but a_pool [S, r, in] "
                         f"has in={a_pool.shape[2]} (shape {tuple(a_pool.shape)}): the pool belongs to "
                         f"another projection")
    _check_devices(("x", x), ("a_pool", a_pool))
    meta = _launch_meta(groups, x.device)
    _check_indices(meta, groups, num_batch_rows=x.shape[0], batch_name="x", pool_name="a_pool",
                   pool_entries=a_pool.shape[0])

    n, rank, in_f = groups.num_rows, a_pool.shape[1], x.shape[1]
    xa = torch.empty(n, rank, dtype=x.dtype, device=x.device)  # [n, r]
    if n == 0 or rank == 0:
        return xa
    grid = (triton.cdiv(meta.max_seg_len, SHRINK_BLOCK_M), triton.cdiv(rank, SHRINK_BLOCK_R), groups.num_segments)
    _shrink_kernel[grid](
        x, a_pool, xa, meta.rows, meta.seg_lens, meta.seg_starts, meta.seg_slots,
        in_f, rank,
        x.stride(0), x.stride(1),
        a_pool.stride(0), a_pool.stride(1), a_pool.stride(2),
        xa.stride(0), xa.stride(1),
        BLOCK_M=SHRINK_BLOCK_M, BLOCK_R=SHRINK_BLOCK_R, BLOCK_K=SHRINK_BLOCK_K,
    )
    return xa


def lora_expand(xa: torch.Tensor, b_pool: torch.Tensor, groups: TokenGroups, y: torch.Tensor) -> None:
    """Expand each served token by its own adapter's B (scale folded in), adding into y in place.

    xa [n, r], b_pool [S, out, r], y [T, out] (any strides: a column slice of a fused output
    is fine); rows of y that are not served are never read or written:

        for i, row in enumerate(served rows):        # groups.rows, or row_start .. row_start + n
            y[row] += b_pool[groups.row_slots[i]] @ xa[i]   # float32 sum, one rounding to y's dtype
    """
    _check_tensor("xa", xa, 2, "[n, r]")
    _check_tensor("b_pool", b_pool, 3, "[S, out, r]")
    _check_tensor("y", y, 2, "[T, out]")
    _check_same_dtype(("xa", xa), ("b_pool", b_pool), ("y", y))
    if xa.shape[1] != b_pool.shape[2]:
        raise ValueError(f"rank classes differ: xa [n, r] has r={xa.shape[1]} (shape {tuple(xa.shape)}) but "
                         f"b_pool [S, out, r] has r={b_pool.shape[2]} (shape {tuple(b_pool.shape)}); "
                         f"expand with the B pool of the rank class that produced xa")
    if xa.shape[0] != groups.num_rows:
        raise ValueError(f"xa [n, r] has {xa.shape[0]} rows (shape {tuple(xa.shape)}) but groups serve "
                         f"num_rows={groups.num_rows}: xa must come from lora_shrink with the same groups")
    if y.shape[1] != b_pool.shape[1]:
        raise ValueError(f"y [T, out] has out={y.shape[1]} (shape {tuple(y.shape)}) but b_pool [S, out, r] "
                         f"has out={b_pool.shape[1]} (shape {tuple(b_pool.shape)}): pass the column slice "
                         f"of y this projection writes")
    _check_devices(("xa", xa), ("b_pool", b_pool), ("y", y))
    meta = _launch_meta(groups, y.device)
    _check_indices(meta, groups, num_batch_rows=y.shape[0], batch_name="y", pool_name="b_pool",
                   pool_entries=b_pool.shape[0])

    n, out_f, rank = groups.num_rows, b_pool.shape[1], b_pool.shape[2]
    if n == 0 or out_f == 0 or rank == 0:
        return
    grid = (triton.cdiv(meta.max_seg_len, EXPAND_BLOCK_M), triton.cdiv(out_f, EXPAND_BLOCK_N), groups.num_segments)
    _expand_kernel[grid](
        xa, b_pool, y, meta.rows, meta.seg_lens, meta.seg_starts, meta.seg_slots,
        out_f, rank,
        xa.stride(0), xa.stride(1),
        b_pool.stride(0), b_pool.stride(1), b_pool.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=EXPAND_BLOCK_M, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=EXPAND_BLOCK_R,
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
    """What a launch needs from a TokenGroups, on the device, plus host-side bounds."""

    __slots__ = ("rows", "seg_lens", "seg_starts", "seg_slots", "max_seg_len", "max_slot", "max_row")

    def __init__(self, groups: TokenGroups, device: torch.device) -> None:
        n = groups.num_rows
        if groups.rows is None:  # contiguous served rows: index them through an arange
            rows = torch.arange(groups.row_start, groups.row_start + n, dtype=torch.long, device=device)
        else:
            rows = groups.rows.to(device=device, dtype=torch.long)
        seg_lens = groups.seg_lens.to(device=device, dtype=torch.long)
        self.rows = rows.contiguous()  # [n]
        self.seg_lens = seg_lens.contiguous()  # [G]
        self.seg_starts = (torch.cumsum(seg_lens, 0) - seg_lens).contiguous()  # [G] first served row
        self.seg_slots = groups.seg_slots.to(device=device, dtype=torch.long).contiguous()  # [G]
        if self.rows.numel() != n:
            raise ValueError(f"groups.rows has {self.rows.numel()} entries but num_rows={n}")
        self.max_seg_len, self.max_slot, self.max_row = 0, -1, -1
        if groups.num_segments:  # the single host synchronisation, once per groups object
            stats = [seg_lens.max(), seg_lens.sum(), seg_lens.min(), self.seg_slots.max(), self.seg_slots.min()]
            if n:
                stats += [rows.max(), rows.min()]
            stats = torch.stack(stats).tolist()
            self.max_seg_len, total, min_len, self.max_slot, min_slot = stats[:5]
            self.max_row, min_row = stats[5:] if n else (-1, 0)
            if min_len < 0 or min_slot < 0 or min_row < 0:
                raise ValueError(f"groups hold a negative length, pool entry or row: seg_lens "
                                 f"{groups.seg_lens.tolist()}, seg_slots {groups.seg_slots.tolist()}")
            if total != n:
                raise ValueError(f"groups are inconsistent: seg_lens sum to {total} but num_rows={n}")
        elif n:
            raise ValueError(f"groups have no segment but num_rows={n}")


_META: dict[int, _Meta] = {}


def _launch_meta(groups: TokenGroups, device: torch.device) -> _Meta:
    """The launch metadata of `groups` on `device`, built once per groups object (see the module doc)."""
    for name in ("rows", "seg_lens", "seg_slots"):
        t = getattr(groups, name)
        if t is not None and t.device != device:
            raise ValueError(f"groups.{name} is on {t.device} but the tensors are on {device}: build the "
                             f"TokenGroups with device={str(device)!r}")
    key = id(groups)  # groups are frozen; the entry leaves with the object
    meta = _META.get(key)
    if meta is None:
        meta = _Meta(groups, device)
        weakref.finalize(groups, _META.pop, key, None)
        _META[key] = meta
    return meta


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


def _check_indices(meta: _Meta, groups: TokenGroups, num_batch_rows: int, batch_name: str, pool_name: str,
                   pool_entries: int) -> None:
    if meta.max_slot >= pool_entries:
        raise ValueError(f"groups use pool entry {meta.max_slot} but {pool_name} has {pool_entries} entries "
                         f"(seg_slots {groups.seg_slots.tolist()})")
    if meta.max_row >= num_batch_rows:
        raise ValueError(f"groups serve batch row {meta.max_row} but {batch_name} has {num_batch_rows} rows")
