"""The Triton LoRA kernels against the PyTorch twin, the naive reference and a dense float32
computation written here.

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET=1), float32/float16 only, with the module's fixed block sizes; where a GPU is
present they run on it. Every expand adds into a column slice of a wider output that already
holds values: columns outside the slice and rows without an adapter must stay bit-identical.
"""
from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("triton")

from loraplex.kernels import TokenGroups, get_lora_ops, lora_reference, lora_torch  # noqa: E402
from loraplex.kernels import lora_triton, triton_kernels, triton_launch  # noqa: E402

# float32: all paths accumulate in float32 and differ only in summation order; magnitudes are
# O(1) (x ~ N(0, 1), A scaled by 1/sqrt(in), B by 1/sqrt(r)), so atol/rtol 1e-5 is a few ulps.
F32_TOL = dict(atol=1e-5, rtol=1e-5)
# float16 (eps ~ 1e-3, |xa| and |y| up to ~6): every path rounds xa to float16 once (one ulp,
# ~1e-3 relative), then the update to y's dtype: the torch twin and the reference round the
# update and then the sum (two roundings), the kernel rounds the float32 sum once. An ulp of xa
# moves the update by up to ~ulp * sqrt(r); both together stay within atol/rtol 1e-2 between
# paths, and within 2e-2 of the unrounded float32 dense result (the same bounds as the twin's
# own tests against the reference).
F16_PAIR_TOL = dict(atol=1e-2, rtol=1e-2)
F16_DENSE_TOL = dict(atol=2e-2, rtol=2e-2)

NUM_POOL_ENTRIES = 5  # pool entries [S, r, in]; segments use them out of order and repeat them

# name -> (batch rows T, segment first rows, segment lengths, pool entries)
LAYOUTS = {
    "single": (12, [3], [7], [1]),  # one adapter, one segment, contiguous rows
    "decode": (9, [0, 1, 2, 3, 4, 5], [1] * 6, [2, 0, 4, 2, 1, 3]),  # one row per segment
    "decode_gaps": (10, [0, 2, 3, 7, 9], [1] * 5, [3, 3, 0, 4, 1]),  # rows without adapter between
    "decode_many": (45, list(range(2, 42)), [1] * 40, [(7 * k) % 5 for k in range(40)]),  # > BLOCK_M segments
    "prefill": (17, [0, 5, 12], [5, 7, 3], [0, 2, 1]),
    "prefill_gaps": (22, [1, 9, 14, 19], [6, 3, 5, 2], [3, 1, 3, 0]),
    "prefill_long": (80, [2, 40, 75], [37, 33, 4], [4, 0, 2]),  # several 16-row blocks per segment
    "zero_middle": (12, [0, 4, 4], [4, 0, 6], [1, 3, 2]),  # a zero-length segment, contiguous rows
    "zero_with_gaps": (14, [0, 1, 6, 6], [0, 4, 0, 5], [4, 0, 2, 3]),  # zero-length ones and gaps
    "only_zero": (6, [3], [0], [1]),
    "no_segment": (6, [], [], []),
}
SHAPES = [(72, 40), (200, 136)]  # (in_features, out_features): not powers of two
RANKS = [1, 3, 16, 17, 64, 128, 8, 33, 2, 100, 13]  # one per layout below, cycled
DTYPES = [torch.float32, torch.float16]


def _served(starts, lens, entries) -> list[tuple[int, int]]:
    """(batch row, pool entry) of every served row, in served order, written out by hand."""
    return [(s + k, e) for s, n, e in zip(starts, lens, entries) for k in range(n)]


def _operands(T, in_f, out_f, rank, dtype, seed, extra_cols=(3, 5), entries=NUM_POOL_ENTRIES):
    """x [T, in], A pool, B pool (scale folded in), and a wide y with the target columns in the middle."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    a_pool = (torch.randn(entries, rank, in_f, generator=gen) / in_f**0.5).to(dtype)
    b_pool = (torch.randn(entries, out_f, rank, generator=gen) / rank**0.5).to(dtype)
    left, right = extra_cols
    y_wide = torch.randn(T, left + out_f + right, generator=gen).to(dtype)
    return x, a_pool, b_pool, y_wide


def _dense(x, a_pool, b_pool, y, served):
    """float32: xa[i] = A[e] @ x[row]; y[row] += B[e] @ xa[i]."""
    xa = torch.zeros(len(served), a_pool.shape[1])
    for i, (row, e) in enumerate(served):
        xa[i] = a_pool[e].float() @ x[row].float()
    out = y.float().clone()
    for i, (row, e) in enumerate(served):
        out[row] += b_pool[e].float() @ xa[i]
    return xa, out


def _run_triton(x, a_pool, b_pool, y, starts, lens, entries, device):
    """Shrink then expand on `device` (the CPU interpreter or a GPU); returns xa and y on the CPU."""
    g = TokenGroups.build(starts, lens, entries, device)
    xa = lora_triton.lora_shrink(x.to(device), a_pool.to(device), g)
    y_dev = y.to(device, copy=True)  # on the CPU .to() alone would alias y
    lora_triton.lora_expand(xa, b_pool.to(device), g, y_dev)
    return xa.cpu(), y_dev.cpu()


def _layout_cases():
    for i, layout in enumerate(LAYOUTS):
        in_f, out_f = SHAPES[i % len(SHAPES)]
        rank = RANKS[i % len(RANKS)]
        for dtype in DTYPES:
            yield pytest.param(layout, rank, dtype, in_f, out_f,
                               id=f"{layout}-r{rank}-{str(dtype)[6:]}-{in_f}x{out_f}")


@pytest.mark.parametrize("layout,rank,dtype,in_f,out_f", list(_layout_cases()))
def test_triton_matches_torch_reference_and_dense(layout, rank, dtype, in_f, out_f, triton_device):
    T, starts, lens, entries = LAYOUTS[layout]
    served = _served(starts, lens, entries)
    left = 3  # _operands pads y with 3 columns on the left (and 5 on the right)
    x, a_pool, b_pool, y_wide = _operands(T, in_f, out_f, rank, dtype, seed=rank * 1000 + in_f)
    groups = TokenGroups.build(starts, lens, entries)
    dense_xa, dense_y = _dense(x, a_pool, b_pool, y_wide[:, left : left + out_f], served)
    dense_tol, pair_tol = (F32_TOL, F32_TOL) if dtype == torch.float32 else (F16_DENSE_TOL, F16_PAIR_TOL)

    # the kernel path: on the interpreter the wide y is passed as a column-slice view directly
    g = TokenGroups.build(starts, lens, entries, triton_device)
    xa = lora_triton.lora_shrink(x.to(triton_device), a_pool.to(triton_device), g)
    assert xa.shape == (len(served), rank) and xa.dtype == dtype and xa.device.type == triton_device.type
    y = y_wide.to(triton_device, copy=True)  # on the CPU .to() alone would alias y_wide
    lora_triton.lora_expand(xa, b_pool.to(triton_device), g, y[:, left : left + out_f])
    xa, y = xa.cpu(), y.cpu()

    # columns outside the slice and rows without an adapter are untouched, bit for bit
    assert torch.equal(y[:, :left], y_wide[:, :left])
    assert torch.equal(y[:, left + out_f :], y_wide[:, left + out_f :])
    unserved = sorted(set(range(T)) - {row for row, _ in served})
    assert torch.equal(y[unserved], y_wide[unserved])
    if not served:
        assert torch.equal(y, y_wide)

    torch.testing.assert_close(xa.float(), dense_xa, **dense_tol)
    torch.testing.assert_close(y[:, left : left + out_f].float(), dense_y, **dense_tol)
    for ops in (lora_torch, lora_reference):
        xa_ops = ops.lora_shrink(x, a_pool, groups)
        y_ops = y_wide.clone()
        ops.lora_expand(xa_ops, b_pool, groups, y_ops[:, left : left + out_f])
        torch.testing.assert_close(xa.float(), xa_ops.float(), **pair_tol, msg=f"shrink vs {ops.__name__}")
        torch.testing.assert_close(y.float(), y_ops.float(), **pair_tol, msg=f"expand vs {ops.__name__}")


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 15, 16, 31, 32, 48, 64, 128])
def test_every_rank_matches_torch(rank, triton_device):
    """Ranks below, at and above multiples of the 16-wide rank tile, one rank class per call."""
    T, starts, lens, entries = LAYOUTS["prefill_gaps"]
    x, a_pool, b_pool, y_wide = _operands(T, 200, 136, rank, torch.float32, seed=rank, extra_cols=(0, 0))
    xa, y = _run_triton(x, a_pool, b_pool, y_wide, starts, lens, entries, triton_device)
    g = TokenGroups.build(starts, lens, entries)
    xa_torch = lora_torch.lora_shrink(x, a_pool, g)
    y_torch = y_wide.clone()
    lora_torch.lora_expand(xa_torch, b_pool, g, y_torch)
    torch.testing.assert_close(xa, xa_torch, **F32_TOL)
    torch.testing.assert_close(y, y_torch, **F32_TOL)
    unserved = sorted(set(range(T)) - {row for row, _ in _served(starts, lens, entries)})
    assert torch.equal(y[unserved], y_wide[unserved])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_rank_classes_served_in_one_step(form, dtype, triton_device):
    """As a layer does: one pool pair per rank class, one TokenGroups per class, one shrink and one
    expand per class, all adding into one y (a column slice of a fused output)."""
    in_f, out_f, T, left = 200, 136, 34, 4
    ranks = [1, 4, 13, 16, 64, 128]
    gen = torch.Generator().manual_seed(11)
    pools = {r: ((torch.randn(3, r, in_f, generator=gen) / in_f**0.5).to(dtype),
                 (torch.randn(3, out_f, r, generator=gen) / r**0.5).to(dtype)) for r in ranks}
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    y_wide = torch.randn(T, left + out_f + 6, generator=gen).to(dtype)
    # rows 0, 1 and the last rows have no adapter; segments alternate rank classes; in prefill
    # every fourth segment is empty (an adapter present in the class with no row this step)
    seg_len = 1 if form == "decode" else 3
    layout: dict[int, tuple[list, list, list]] = {r: ([], [], []) for r in ranks}
    row, k = 2, 0
    while row + seg_len <= T - 2:
        r = ranks[k % len(ranks)]
        n = 0 if form == "prefill" and k % 4 == 3 else seg_len
        layout[r][0].append(row)
        layout[r][1].append(n)
        layout[r][2].append((k // len(ranks)) % 3)
        row += n
        k += 1
    served_rows = {row for starts, lens, entries in layout.values() for row, _ in _served(starts, lens, entries)}
    unserved = sorted(set(range(T)) - served_rows)
    assert len(unserved) >= 3

    cols = slice(left, left + out_f)
    expected = y_wide.float().clone()
    for r, (starts, lens, entries) in layout.items():
        a_pool, b_pool = pools[r]
        _, expected[:, cols] = _dense(x, a_pool, b_pool, expected[:, cols], _served(starts, lens, entries))

    y_torch = y_wide.clone()
    y_triton = y_wide.to(triton_device, copy=True)
    for r, (starts, lens, entries) in layout.items():
        a_pool, b_pool = pools[r]
        g = TokenGroups.build(starts, lens, entries)
        assert g.rows is not None  # other classes' rows sit between this class's segments
        lora_torch.lora_expand(lora_torch.lora_shrink(x, a_pool, g), b_pool, g, y_torch[:, cols])
        g_dev = TokenGroups.build(starts, lens, entries, triton_device)
        xa = lora_triton.lora_shrink(x.to(triton_device), a_pool.to(triton_device), g_dev)
        lora_triton.lora_expand(xa, b_pool.to(triton_device), g_dev, y_triton[:, cols])
    y_triton = y_triton.cpu()

    pair_tol, dense_tol = (F32_TOL, F32_TOL) if dtype == torch.float32 else (F16_PAIR_TOL, F16_DENSE_TOL)
    torch.testing.assert_close(y_triton.float(), y_torch.float(), **pair_tol)
    torch.testing.assert_close(y_triton.float(), expected, **dense_tol)
    assert torch.equal(y_triton[unserved], y_wide[unserved])
    assert torch.equal(y_triton[:, :left], y_wide[:, :left])
    assert torch.equal(y_triton[:, left + out_f :], y_wide[:, left + out_f :])


def test_strided_inputs_and_outputs(triton_device):
    """x a column slice of a wider input; y a view whose columns are not contiguous (stride(1) != 1)."""
    T, starts, lens, entries = LAYOUTS["prefill_gaps"]
    in_f, out_f, rank = 72, 40, 16
    x, a_pool, b_pool, _ = _operands(T, in_f, out_f, rank, torch.float32, seed=21)
    x_wide = torch.randn(T, in_f + 9)
    x_wide[:, 4 : 4 + in_f] = x
    y_t = torch.randn(out_f + 7, T)  # y is y_t.t()[:, 2 : 2 + out_f]: strides (1, T)
    dense_xa, dense_y = _dense(x, a_pool, b_pool, y_t.t()[:, 2 : 2 + out_f], _served(starts, lens, entries))

    g_dev = TokenGroups.build(starts, lens, entries, triton_device)
    xa = lora_triton.lora_shrink(x_wide.to(triton_device)[:, 4 : 4 + in_f], a_pool.to(triton_device), g_dev)
    y_t_dev = y_t.to(triton_device, copy=True)
    y_view = y_t_dev.t()[:, 2 : 2 + out_f]
    assert y_view.stride() == (1, T)
    lora_triton.lora_expand(xa, b_pool.to(triton_device), g_dev, y_view)
    y_t_out = y_t_dev.cpu()
    torch.testing.assert_close(xa.cpu(), dense_xa, **F32_TOL)
    torch.testing.assert_close(y_t_out.t()[:, 2 : 2 + out_f], dense_y, **F32_TOL)
    assert torch.equal(y_t_out[:2], y_t[:2]) and torch.equal(y_t_out[2 + out_f :], y_t[2 + out_f :])


def test_one_launch_per_call_with_the_segment_grid(monkeypatch, triton_device):
    """Each op launches its kernel once for all segments; the grid is (row blocks of the longest
    segment, rank/column blocks, segments); no launch at all when nothing is served."""
    launches = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append((self.name, tuple(grid)))
            return self.kernel[grid]

    for name in ("shrink_kernel", "expand_kernel"):
        monkeypatch.setattr(lora_triton, name, Spy(name, getattr(lora_triton, name)))
    T, starts, lens, entries = LAYOUTS["prefill_long"]  # longest segment 37 rows
    x, a_pool, b_pool, y = _operands(T, 200, 136, 33, torch.float32, seed=2, extra_cols=(0, 0))
    _run_triton(x, a_pool, b_pool, y, starts, lens, entries, triton_device)
    m = lora_triton
    assert launches == [
        ("shrink_kernel", (-(-37 // m.SHRINK_BLOCK_M), -(-33 // m.SHRINK_BLOCK_R), 3)),
        ("expand_kernel", (-(-37 // m.EXPAND_BLOCK_M), -(-136 // m.EXPAND_BLOCK_N), 3)),
    ]
    launches.clear()
    for layout in ("only_zero", "no_segment"):
        T, starts, lens, entries = LAYOUTS[layout]
        x, a_pool, b_pool, y = _operands(T, 72, 40, 8, torch.float32, seed=3, extra_cols=(0, 0))
        xa, y_out = _run_triton(x, a_pool, b_pool, y, starts, lens, entries, triton_device)
        assert xa.shape == (0, 8) and torch.equal(y_out, y)
    assert launches == []


def test_block_sizes_are_fixed_and_fit_tl_dot():
    m = lora_triton
    blocks = (m.SHRINK_BLOCK_M, m.SHRINK_BLOCK_R, m.SHRINK_BLOCK_K, m.EXPAND_BLOCK_M, m.EXPAND_BLOCK_N,
              m.EXPAND_BLOCK_R, m.MERGE_BLOCK_M, m.MERGE_BLOCK_N, m.MERGE_BLOCK_R)
    assert all(b >= 16 and b & (b - 1) == 0 for b in blocks)
    assert m.SHRINK_BLOCK_R == m.EXPAND_BLOCK_R == m.MERGE_BLOCK_R == 16  # the rank tile: the smallest dot


def test_launch_metadata_is_memoised_per_groups_object(triton_device):
    T, starts, lens, entries = LAYOUTS["decode_gaps"]
    x, a_pool, b_pool, _ = _operands(T, 72, 40, 4, torch.float32, seed=4)
    g = TokenGroups.build(starts, lens, entries, triton_device)
    x, a_pool = x.to(triton_device), a_pool.to(triton_device)
    first = lora_triton.lora_shrink(x, a_pool, g)
    key = (id(g),)
    meta = triton_launch._META[key]
    assert meta.rows.tolist() == [0, 2, 3, 7, 9] and meta.seg_starts.tolist() == [0, 1, 2, 3, 4]
    assert (meta.max_seg_len, meta.max_entries, meta.max_rows) == (1, [4], [9])
    assert torch.equal(lora_triton.lora_shrink(x, a_pool, g), first)
    assert triton_launch._META[key] is meta
    del g
    gc.collect()
    assert key not in triton_launch._META


def test_get_lora_ops_triton_on_cpu_is_the_interpreted_module():
    ops = get_lora_ops("triton", "cpu")
    assert ops is lora_triton
    assert callable(ops.lora_shrink) and callable(ops.lora_expand) and callable(ops.merge)
    if not torch.cuda.is_available():
        assert triton_kernels.INTERPRETED


# assertions -------------------------------------------------------------------------------


def _bad_calls(device):
    """(id, call, words the message must contain), float32 unless stated."""
    g = TokenGroups.build([0, 3], [2, 2], [0, 2], device)  # rows 0, 1, 3, 4; pool entries 0 and 2
    x, a, b = torch.randn(6, 72), torch.randn(3, 8, 72), torch.randn(3, 40, 8)
    xa, y = torch.randn(4, 8), torch.randn(6, 40)
    x, a, b, xa, y = (t.to(device) for t in (x, a, b, xa, y))
    shrink, expand = lora_triton.lora_shrink, lora_triton.lora_expand
    return [
        ("x-1d", lambda: shrink(x[0], a, g), ["x", "2-D", "(72,)"]),
        ("a_pool-2d", lambda: shrink(x, a[0], g), ["a_pool", "3-D", "(8, 72)"]),
        ("in-mismatch", lambda: shrink(x[:, :70], a, g), ["x", "a_pool", "70", "72", "(6, 70)", "(3, 8, 72)"]),
        ("shrink-dtype-mismatch", lambda: shrink(x.half(), a, g), ["a_pool", "torch.float32", "torch.float16"]),
        ("int-dtype", lambda: shrink(x.long(), a.long(), g), ["x", "torch.int64", "float32"]),
        ("pool-entry-out-of-range", lambda: shrink(x, a[:2], g), ["pool entry 2", "a_pool", "2 entries"]),
        ("batch-too-short", lambda: shrink(x[:4], a, g), ["row 4", "x", "4 rows"]),
        ("rank-class-mismatch", lambda: expand(xa, torch.randn(3, 40, 16), g, y),
         ["rank", "xa", "b_pool", "r=8", "r=16", "(4, 8)", "(3, 40, 16)"]),
        ("xa-rows", lambda: expand(xa[:3], b, g, y), ["xa", "3 rows", "num_rows=4"]),
        ("out-mismatch", lambda: expand(xa, b, g, y[:, :39]), ["y", "b_pool", "out=39", "out=40", "(6, 39)"]),
        ("expand-dtype-mismatch", lambda: expand(xa, b, g, y.half()), ["y", "torch.float16", "torch.float32"]),
        ("y-1d", lambda: expand(xa, b, g, y[0]), ["y", "2-D"]),
        ("bfloat16-on-cpu", lambda: shrink(x.bfloat16(), a.bfloat16(), g), ["bfloat16", "interpreter"]),
    ]


_BAD_IDS = [c[0] for c in _bad_calls(torch.device("cpu"))]


@pytest.mark.parametrize("case", range(len(_BAD_IDS)), ids=_BAD_IDS)
def test_bad_arguments_raise_value_error_naming_the_problem(case, triton_device):
    name, call, words = _bad_calls(triton_device)[case]
    if name == "bfloat16-on-cpu" and triton_device.type != "cpu":
        pytest.skip("only the interpreter lacks bfloat16")
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# fused problems: every slice and rank class of a layer in one launch ------------------------


class _LaunchSpy:
    """Records (kernel, grid) of every launch while forwarding to the real kernel."""

    def __init__(self, monkeypatch):
        self.launches: list[tuple[str, tuple]] = []
        for name in ("shrink_kernel", "expand_kernel"):
            monkeypatch.setattr(lora_triton, name, self._wrap(name, getattr(lora_triton, name)))

    def _wrap(self, name, kernel):
        spy = self

        class Launcher:
            def __getitem__(self, grid):
                spy.launches.append((name, tuple(grid)))
                return kernel[grid]

        return Launcher()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_fused_ops_one_launch_each_match_torch_and_dense(form, dtype, fused_case, monkeypatch, triton_device):
    """Slices q/k/v of widths 136/40/72, ranks 1 to 128 mixed in one batch (some adapters leave a
    slice alone), a zero-length segment, rows without adapter: ONE shrink and ONE expand launch."""
    x, y0, problems, expected, unserved = fused_case(form, dtype, seed=7)
    dev = triton_device
    groups = [TokenGroups.build(s, n, e, dev) for _, _, s, n, e, _ in problems]
    a_pools = [p[0].to(dev) for p in problems]
    b_pools = [p[1].to(dev) for p in problems]
    cols = [p[5] for p in problems]
    spy = _LaunchSpy(monkeypatch)
    y = y0.to(dev, copy=True)
    xas = lora_triton.lora_shrink_fused(x.to(dev), a_pools, groups)
    lora_triton.lora_expand_fused(xas, b_pools, groups, y, cols)
    y = y.cpu()

    longest = max(max(p[3]) for p in problems)
    num_segments = sum(len(p[3]) for p in problems)
    assert len(problems) >= 10 and num_segments > len(problems)
    m = lora_triton
    assert spy.launches == [
        ("shrink_kernel", (-(-longest // m.SHRINK_BLOCK_M), -(-128 // m.SHRINK_BLOCK_R), num_segments)),
        ("expand_kernel", (-(-longest // m.EXPAND_BLOCK_M), -(-136 // m.EXPAND_BLOCK_N), num_segments)),
    ]

    torch_groups = [TokenGroups.build(s, n, e) for _, _, s, n, e, _ in problems]
    y_torch = y0.clone()
    xas_torch = lora_torch.lora_shrink_fused(x, [p[0] for p in problems], torch_groups)
    lora_torch.lora_expand_fused(xas_torch, [p[1] for p in problems], torch_groups, y_torch, cols)
    pair_tol, dense_tol = (F32_TOL, F32_TOL) if dtype == torch.float32 else (F16_PAIR_TOL, F16_DENSE_TOL)
    for xa, xa_torch in zip(xas, xas_torch):
        torch.testing.assert_close(xa.cpu().float(), xa_torch.float(), **pair_tol)
    torch.testing.assert_close(y.float(), y_torch.float(), **pair_tol)
    torch.testing.assert_close(y.float(), expected, **dense_tol)
    assert torch.equal(y[unserved], y0[unserved])


def test_fused_ops_with_one_problem_equal_the_single_ops(triton_device):
    T, starts, lens, entries = LAYOUTS["prefill_gaps"]
    x, a_pool, b_pool, y_wide = _operands(T, 72, 40, 17, torch.float32, seed=8)
    dev = triton_device
    g = TokenGroups.build(starts, lens, entries, dev)
    x, a_pool, b_pool = x.to(dev), a_pool.to(dev), b_pool.to(dev)
    y_single, y_fused = y_wide.to(dev, copy=True), y_wide.to(dev, copy=True)
    xa = lora_triton.lora_shrink(x, a_pool, g)
    lora_triton.lora_expand(xa, b_pool, g, y_single[:, 3:43])
    (xa_fused,) = lora_triton.lora_shrink_fused(x, [a_pool], [g])
    lora_triton.lora_expand_fused([xa_fused], [b_pool], [g], y_fused, [3])
    assert torch.equal(xa_fused, xa) and torch.equal(y_fused, y_single)


def test_fused_ops_refuse_bad_problem_lists(triton_device):
    dev = triton_device
    g = TokenGroups.build([0, 3], [2, 2], [0, 2], dev)
    x, a, b = torch.randn(6, 72, device=dev), torch.randn(3, 8, 72, device=dev), torch.randn(3, 40, 8, device=dev)
    xa, y = torch.randn(4, 8, device=dev), torch.randn(6, 100, device=dev)
    cases = [
        (lambda: lora_triton.lora_shrink_fused(x, [a, a], [g]), ["a_pools", "2 items", "groups has 1"]),
        (lambda: lora_triton.lora_shrink_fused(x, [a, a[:, :, :70]], [g, g]), ["a_pools[1]", "in=70", "in=72"]),
        (lambda: lora_triton.lora_shrink_fused(x, [a, a[:2]], [g, g]), ["pool entry 2", "a_pools[1]"]),
        (lambda: lora_triton.lora_expand_fused([xa], [b], [g], y, [61]), ["cols[0]=61", "out=40", "out=100"]),
        (lambda: lora_triton.lora_expand_fused([xa, xa], [b, b], [g, g], y, [0]), ["cols", "1 items"]),
        (lambda: lora_triton.lora_expand_fused([xa[:3]], [b], [g], y, [0]), ["xas[0]", "3 rows", "num_rows=4"]),
    ]
    for call, words in cases:
        with pytest.raises(ValueError) as info:
            call()
        for word in words:
            assert word in str(info.value), (word, str(info.value))
