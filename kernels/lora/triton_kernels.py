"""The Triton kernels behind `lora_triton`'s ops (the GPU serving path): shrink, expand, merge.

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
"""
import triton
import triton.language as tl

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


@triton.jit
def shrink_kernel(
    x_ptr,  # x [T, in]
    table_ptr,  # [P, SHRINK_TABLE] int64 per problem: A pool address, xa address, rank, first served row
    #             in rows_ptr, strides of the A pool (entry, rank, in)
    rows_ptr,  # [sum n_p] int64: batch row of each served row, problem after problem
    seg_problem_ptr, seg_lens_ptr, seg_starts_ptr, seg_entries_ptr,  # [G] int64: problem, rows,
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
    problem = table_ptr + tl.load(seg_problem_ptr + seg) * TABLE  # its row of the table
    R = tl.load(problem + 2)
    if pid_r * BLOCK_R >= R:  # beyond this problem's own rank
        return
    a_ptr = tl.load(problem + 0).to(tl.pointer_type(x_ptr.dtype.element_ty))
    xa_ptr = tl.load(problem + 1).to(tl.pointer_type(x_ptr.dtype.element_ty))
    row_base = tl.load(problem + 3)
    stride_as = tl.load(problem + 4)
    stride_ar = tl.load(problem + 5)
    stride_ak = tl.load(problem + 6)
    seg_start = tl.load(seg_starts_ptr + seg)
    entry = tl.load(seg_entries_ptr + seg)  # pool entry

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] row within the segment
    mask_m = offs_m < seg_len
    served = seg_start + offs_m  # [BM] row of this problem's xa
    batch_rows = tl.load(rows_ptr + row_base + served, mask=mask_m, other=0)  # [BM] row of x
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    mask_r = offs_r < R

    x_rows = x_ptr + batch_rows[:, None] * stride_xt  # [BM, 1]
    a_cols = a_ptr + entry * stride_as + offs_r[None, :] * stride_ar  # [1, BR]
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
def expand_kernel(
    y_ptr,  # y [T, out_total] (any strides)
    table_ptr,  # [P, EXPAND_TABLE] int64 per problem: xa address, B pool address, rank, out, first
    #             column in y, first served row in rows_ptr, strides of xa (row, rank) and of the
    #             B pool (entry, out, rank)
    rows_ptr,  # [sum n_p] int64: batch row of each served row, problem after problem
    seg_problem_ptr, seg_lens_ptr, seg_starts_ptr, seg_entries_ptr,  # [G] int64, as for shrink
    stride_yt, stride_yn,
    TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)  # block of the segment's rows
    pid_n = tl.program_id(1)  # block of output columns
    seg = tl.program_id(2)
    seg_len = tl.load(seg_lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    problem = table_ptr + tl.load(seg_problem_ptr + seg) * TABLE  # its row of the table
    N = tl.load(problem + 3)
    if pid_n * BLOCK_N >= N:  # beyond this slice's own width
        return
    xa_ptr = tl.load(problem + 0).to(tl.pointer_type(y_ptr.dtype.element_ty))
    b_ptr = tl.load(problem + 1).to(tl.pointer_type(y_ptr.dtype.element_ty))
    R = tl.load(problem + 2)
    col = tl.load(problem + 4)
    row_base = tl.load(problem + 5)
    stride_xn = tl.load(problem + 6)
    stride_xr = tl.load(problem + 7)
    stride_bs = tl.load(problem + 8)
    stride_bn = tl.load(problem + 9)
    stride_br = tl.load(problem + 10)
    seg_start = tl.load(seg_starts_ptr + seg)
    entry = tl.load(seg_entries_ptr + seg)  # pool entry

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    mask_m = offs_m < seg_len
    served = seg_start + offs_m  # [BM] row of this problem's xa
    batch_rows = tl.load(rows_ptr + row_base + served, mask=mask_m, other=0)  # [BM] row of y
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] column within the slice
    mask_n = offs_n < N

    xa_rows = xa_ptr + served[:, None] * stride_xn  # [BM, 1]
    b_cols = b_ptr + entry * stride_bs + offs_n[None, :] * stride_bn  # [1, BN]
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
def merge_kernel(
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
INTERPRETED = type(shrink_kernel).__name__ == "InterpretedFunction"
