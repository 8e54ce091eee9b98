"""The vectorised PyTorch LoRA ops against the naive reference, and both against a dense
computation written here (one matmul per served row, float32).

Every case expands into a column slice of a wider output that already holds values, so the
tests also check that `lora_expand` adds (never overwrites), and leaves other columns and rows
without an adapter bit-for-bit untouched.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import TokenGroups, get_lora_ops
from loraplex.kernels import lora_reference, lora_torch

# float32: torch path and reference agree with the dense float32 result within
# atol 1e-5 / rtol 1e-5 (magnitudes below are O(1), so this is a few ulps of summation order).
F32_TOL = dict(atol=1e-5, rtol=1e-5)
# float16: inputs are O(1) (x ~ N(0, 1), A scaled by 1/sqrt(in), B by 1/sqrt(r), so xa and the
# update are O(1)); the float16 rounding of xa and of y (eps ~ 1e-3, |y| <= ~6) bounds the
# error against the float32 dense result by atol 2e-2 / rtol 2e-2. Torch vs reference (both
# round xa to float16 the same way) within atol 1e-2 / rtol 1e-2.
F16_DENSE_TOL = dict(atol=2e-2, rtol=2e-2)
F16_PAIR_TOL = dict(atol=1e-2, rtol=1e-2)

NUM_POOL_ENTRIES = 5  # pool entries [S, r, in]; segments use entries out of order and repeat them

# name -> (num batch rows T, segment first rows, segment lengths, pool entries, the torch form)
LAYOUTS = {
    # exactly one segment: plain mm
    "single": (12, [3], [7], [1], "mm"),
    # decode, each entry of a contiguous range once and in order: the padded grid is the rows
    "decode_in_order": (7, [1, 2, 3, 4], [1] * 4, [1, 2, 3, 4], "padded"),
    # decode over nearly all entries, out of order and repeated: a padded grid with an index
    "decode": (9, [0, 1, 2, 3, 4, 5], [1] * 6, [2, 0, 4, 2, 1, 3], "padded"),
    # the same with rows without adapter between segments: `rows` is an index tensor
    "decode_gaps": (10, [0, 2, 3, 7, 9], [1] * 5, [3, 3, 0, 4, 1], "padded"),
    # decode over few, far apart entries (a grid would read unused ones): gather + bmm
    "decode_sparse": (8, [0, 1, 2, 3, 4, 5], [1] * 6, [0, 4, 0, 4, 0, 4], "gather"),
    # rows == 2 * segments is still the gather form (the boundary)
    "gather_boundary": (8, [1, 2], [1, 3], [4, 0], "gather"),
    # long segments (prefill) over a contiguous range: padded, contiguous rows
    "prefill": (17, [0, 5, 12], [5, 7, 3], [0, 2, 1], "padded"),
    # one long and one short segment (a grid would pad the short one): grouped_mm
    "prefill_unbalanced": (20, [0, 16], [16, 2], [0, 3], "segment"),
    # prefill with gaps (and one entry used by two segments): grouped_mm over gathered rows
    "prefill_gaps": (22, [1, 9, 14, 19], [6, 3, 5, 2], [3, 1, 3, 0], "segment"),
}
SHAPES = [(72, 40), (200, 136)]  # (in_features, out_features): not powers of two
RANKS = [1, 2, 3, 4, 8, 13, 16, 64, 128]
DTYPES = [torch.float32, torch.float16]

def _served(starts, lens, entries) -> list[tuple[int, int]]:
    """(batch row, pool entry) of every served row, written out from the layout by hand."""
    return [(s + k, e) for s, n, e in zip(starts, lens, entries) for k in range(n)]


def _operands(T, in_f, out_f, rank, dtype, seed, extra_cols=(0, 0)):
    """x [T, in], A pool, B pool (scale folded in), and a wide y with the target columns in the middle."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    a_pool = (torch.randn(NUM_POOL_ENTRIES, rank, in_f, generator=gen) / in_f**0.5).to(dtype)
    b_pool = (torch.randn(NUM_POOL_ENTRIES, out_f, rank, generator=gen) / rank**0.5).to(dtype)
    left, right = extra_cols
    y_wide = torch.randn(T, left + out_f + right, generator=gen).to(dtype)
    return x, a_pool, b_pool, y_wide


def _dense(x, a_pool, b_pool, y, served):
    """float32: xa[i] = A[e] @ x[row]; y[row] += B[e] @ xa[i]."""
    xa = torch.stack([a_pool[e].float() @ x[row].float() for row, e in served]) if served else None
    out = y.float().clone()
    for i, (row, e) in enumerate(served):
        out[row] += b_pool[e].float() @ xa[i]
    return xa, out


def _cases():
    for layout, (_, _, _, _, form) in LAYOUTS.items():
        for rank in RANKS:
            for dtype in DTYPES:
                for in_f, out_f in SHAPES:
                    yield pytest.param(layout, rank, dtype, in_f, out_f,
                                       id=f"{layout}-r{rank}-{str(dtype)[6:]}-{in_f}x{out_f}")


@pytest.mark.parametrize("layout,rank,dtype,in_f,out_f", list(_cases()))
def test_shrink_expand_match_reference_and_dense(layout, rank, dtype, in_f, out_f):
    T, starts, lens, entries, _ = LAYOUTS[layout]
    served = _served(starts, lens, entries)
    left, right = 3, 5
    x, a_pool, b_pool, y_wide = _operands(T, in_f, out_f, rank, dtype, seed=rank * 1000 + in_f,
                                         extra_cols=(left, right))
    groups = TokenGroups.build(starts, lens, entries)
    dense_xa, dense_y = _dense(x, a_pool, b_pool, y_wide[:, left : left + out_f], served)
    dense_tol, pair_tol = (F32_TOL, F32_TOL) if dtype == torch.float32 else (F16_DENSE_TOL, F16_PAIR_TOL)

    results = {}
    for name, ops in (("torch", lora_torch), ("reference", lora_reference)):
        xa = ops.lora_shrink(x, a_pool, groups)
        assert xa.shape == (len(served), rank) and xa.dtype == dtype, name
        torch.testing.assert_close(xa.float(), dense_xa, **dense_tol, msg=f"{name} shrink")
        y = y_wide.clone()
        ops.lora_expand(xa, b_pool, groups, y[:, left : left + out_f])
        # columns outside the slice and rows without an adapter are untouched, bit for bit
        assert torch.equal(y[:, :left], y_wide[:, :left]), name
        assert torch.equal(y[:, left + out_f :], y_wide[:, left + out_f :]), name
        unserved = sorted(set(range(T)) - {row for row, _ in served})
        assert torch.equal(y[unserved], y_wide[unserved]), name
        torch.testing.assert_close(y[:, left : left + out_f].float(), dense_y, **dense_tol, msg=f"{name} expand")
        results[name] = (xa, y)

    torch.testing.assert_close(results["torch"][0].float(), results["reference"][0].float(), **pair_tol)
    torch.testing.assert_close(results["torch"][1].float(), results["reference"][1].float(), **pair_tol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_take_the_intended_torch_form(layout, monkeypatch):
    """Each layout above really exercises the form it is named for, and the padded form reads
    its pool range in place (no index_select of the pool)."""
    T, starts, lens, entries, form = LAYOUTS[layout]
    calls = {"bmm": 0, "grouped_mm": 0, "pool gathers": 0}
    real_bmm, real_grouped = torch.bmm, F.grouped_mm
    x, a_pool, b_pool, y = _operands(T, 72, 40, 8, torch.float32, seed=1)
    real_select = torch.Tensor.index_select

    def bmm(*a, **k):
        calls["bmm"] += 1
        return real_bmm(*a, **k)

    def grouped_mm(*a, **k):
        calls["grouped_mm"] += 1
        return real_grouped(*a, **k)

    def index_select(t, *a, **k):
        calls["pool gathers"] += t.data_ptr() in (a_pool.data_ptr(), b_pool.data_ptr())
        return real_select(t, *a, **k)

    monkeypatch.setattr(lora_torch.torch, "bmm", bmm)
    monkeypatch.setattr(lora_torch.F, "grouped_mm", grouped_mm)
    monkeypatch.setattr(torch.Tensor, "index_select", index_select)
    groups = TokenGroups.build(starts, lens, entries)
    assert lora_torch.form_of(groups) == form
    lora_torch.lora_expand(lora_torch.lora_shrink(x, a_pool, groups), b_pool, groups, y)
    expected = {"mm": (0, 0, 0), "padded": (2, 0, 0), "gather": (2, 0, 2), "segment": (0, 2, 2)}[form]
    assert (calls["bmm"], calls["grouped_mm"], calls["pool gathers"]) == expected


def test_padded_rows_place_each_row_by_entry():
    g = TokenGroups.build([0, 1, 2, 3, 4, 5], [1] * 6, [2, 0, 4, 2, 1, 3])
    p = g.padded
    assert (p.entry_lo, p.entries, p.rows_per_entry) == (0, 5, 2)
    assert p.index.tolist() == [4, 0, 8, 5, 2, 6]  # entry 2 twice: grid rows 4 and 5
    rows = torch.arange(6.0).unsqueeze(1)
    grid = p.pad(rows)
    assert grid.shape == (5, 2, 1) and grid.flatten().tolist() == [1, 0, 4, 0, 0, 3, 5, 0, 2, 0]
    assert torch.equal(p.unpad(grid), rows)

    g = TokenGroups.build([3, 5], [2, 2], [6, 7])  # in order, two rows each: no index at all
    assert (g.padded.entry_lo, g.padded.entries, g.padded.rows_per_entry, g.padded.index) == (6, 2, 2, None)
    assert TokenGroups.build([0, 1], [1, 1], [0, 9]).padded is None  # would read 10 entries for 2
    assert TokenGroups.build([0, 10, 11], [10, 1, 1], [0, 1, 2]).padded is None  # 30 grid rows for 12
    assert TokenGroups.build([0], [4], [3]).padded is None  # one segment: a plain mm


def test_token_groups_build_contiguous_and_gathered():
    g = TokenGroups.build([4, 6, 9], [2, 3, 1], [7, 0, 7])
    assert g.rows is None and g.row_start == 4 and g.num_rows == 6 and g.num_segments == 3
    assert g.seg_lens.tolist() == [2, 3, 1] and g.seg_entries.tolist() == [7, 0, 7]
    assert g.row_entries.tolist() == [7, 7, 0, 0, 0, 7]
    assert g.seg_offsets.dtype == torch.int32 and g.seg_offsets.tolist() == [2, 5, 6]
    x = torch.arange(12.0).unsqueeze(1)
    assert g.gather_rows(x).squeeze(1).tolist() == [4, 5, 6, 7, 8, 9]

    g = TokenGroups.build([0, 5], [2, 1], [1, 2])
    assert g.rows is not None and g.rows.dtype == torch.long and g.rows.tolist() == [0, 1, 5]
    assert g.num_rows == 3 and g.row_entries.tolist() == [1, 1, 2]
    assert g.gather_rows(x).squeeze(1).tolist() == [0, 1, 5]
    y = torch.zeros(8, 2)
    g.scatter_add_rows(y[:, 1:], torch.ones(3, 1))  # into a column view
    assert y[:, 1].tolist() == [1, 1, 0, 0, 0, 1, 0, 0] and y[:, 0].abs().sum() == 0


# Zero-length segments: TokenGroups.build accepts them. They serve no row, contribute nothing,
# and keep their place in seg_lens/seg_entries/seg_offsets (repeated offset), so they still count
# in num_segments (which only moves the gather/segment threshold, not the result).
ZERO_LAYOUTS = {
    "middle_contiguous_grouped": (12, [0, 4, 4], [4, 0, 6], [1, 3, 2]),
    "leading_zero_grouped": (12, [0, 0], [0, 9], [4, 0]),
    "zero_in_gather_form": (5, [0, 1, 1], [1, 0, 1], [2, 4, 0]),
    "zero_with_stray_start": (12, [0, 11, 4], [4, 0, 6], [1, 3, 2]),  # its start breaks contiguity
    "only_zero_segment": (6, [3], [0], [1]),
    "no_segment": (6, [], [], []),
}


@pytest.mark.parametrize("layout", list(ZERO_LAYOUTS))
def test_zero_length_segments_serve_nothing(layout):
    T, starts, lens, entries = ZERO_LAYOUTS[layout]
    g = TokenGroups.build(starts, lens, entries)
    assert g.num_rows == sum(lens) and g.num_segments == len(lens)
    assert g.seg_offsets.tolist() == list(torch.tensor(lens, dtype=torch.long).cumsum(0).tolist())
    assert g.row_entries.tolist() == [e for n, e in zip(lens, entries) for _ in range(n)]
    served = _served(starts, lens, entries)
    x, a_pool, b_pool, y0 = _operands(T, 72, 40, 8, torch.float32, seed=7)
    dense_xa, dense_y = _dense(x, a_pool, b_pool, y0, served)
    for ops in (lora_torch, lora_reference):
        xa = ops.lora_shrink(x, a_pool, g)
        assert xa.shape == (len(served), 8)
        if served:
            torch.testing.assert_close(xa, dense_xa, **F32_TOL)
        y = y0.clone()
        ops.lora_expand(xa, b_pool, g, y)
        torch.testing.assert_close(y, dense_y, **F32_TOL)
        if not served:
            assert torch.equal(y, y0)


@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_several_rank_classes_accumulate_into_one_output(form):
    """As a layer does: one pool per rank, one TokenGroups per rank class, all expanding into y."""
    in_f, out_f, T = 200, 136, 30
    # prefill ranks avoid the grouped_mm stride bug (tested above); decode covers odd ranks
    ranks = [1, 8, 33, 128] if form == "decode" else [4, 16, 64, 128]
    gen = torch.Generator().manual_seed(11)
    pools = {r: ((torch.randn(3, r, in_f, generator=gen) / in_f**0.5),
                 (torch.randn(3, out_f, r, generator=gen) / r**0.5)) for r in ranks}
    x = torch.randn(T, in_f, generator=gen)
    y0 = torch.randn(T, out_f, generator=gen)
    # rows 0, 1, 29 have no adapter; the rest alternate rank classes segment by segment
    seg_len = 1 if form == "decode" else 3
    layout: dict[int, tuple[list, list, list]] = {r: ([], [], []) for r in ranks}
    row, k = 2, 0
    while row + seg_len <= T - 1:
        r = ranks[k % len(ranks)]
        layout[r][0].append(row)
        layout[r][1].append(seg_len)
        layout[r][2].append((k // len(ranks)) % 3)
        row += seg_len
        k += 1
    expected = y0.clone()
    for r, (starts, lens, entries) in layout.items():
        a_pool, b_pool = pools[r]
        for row, e in _served(starts, lens, entries):
            expected[row] += b_pool[e] @ (a_pool[e] @ x[row])
    for ops in (lora_torch, lora_reference):
        y = y0.clone()
        for r, (starts, lens, entries) in layout.items():
            g = TokenGroups.build(starts, lens, entries)
            assert g.rows is not None  # other rank classes' rows sit between this class's segments
            ops.lora_expand(ops.lora_shrink(x, pools[r][0], g), pools[r][1], g, y)
        torch.testing.assert_close(y, expected, **F32_TOL)
        assert torch.equal(y[[0, 1, 29]], y0[[0, 1, 29]])


@pytest.mark.parametrize("layout", ["single", "decode_gaps", "prefill"])
def test_expand_into_whole_contiguous_output(layout):
    T, starts, lens, entries, _ = LAYOUTS[layout]
    x, a_pool, b_pool, y0 = _operands(T, 72, 40, 16, torch.float32, seed=3)
    g = TokenGroups.build(starts, lens, entries)
    _, dense_y = _dense(x, a_pool, b_pool, y0, _served(starts, lens, entries))
    for ops in (lora_torch, lora_reference):
        y = y0.clone()
        ops.lora_expand(ops.lora_shrink(x, a_pool, g), b_pool, g, y)
        torch.testing.assert_close(y, dense_y, **F32_TOL)


def test_shrink_segment_form_with_unaligned_in_features():
    T, starts, lens, entries, _ = LAYOUTS["prefill"]
    x, a_pool, _, _ = _operands(T, 70, 40, 8, torch.float32, seed=5)
    g = TokenGroups.build(starts, lens, entries)
    torch.testing.assert_close(lora_torch.lora_shrink(x, a_pool, g), lora_reference.lora_shrink(x, a_pool, g),
                               **F32_TOL)


# registry ---------------------------------------------------------------------------------


def test_get_lora_ops_auto_and_named_paths():
    assert get_lora_ops("auto", "cpu") is lora_torch
    assert get_lora_ops("torch", "cpu") is lora_torch
    assert get_lora_ops("reference", "cpu") is lora_reference
    assert get_lora_ops("reference", torch.device("cpu")) is lora_reference
    for ops in (get_lora_ops("auto", "cpu"), get_lora_ops("reference", "cpu")):
        assert callable(ops.lora_shrink) and callable(ops.lora_expand)


@pytest.mark.parametrize("name", ["cuda", "Torch", "", "naive"])
def test_get_lora_ops_unknown_name(name):
    with pytest.raises(ValueError) as info:
        get_lora_ops(name, "cpu")
    message = str(info.value)
    assert repr(name) in message
    for choice in ("auto", "torch", "triton", "reference"):
        assert choice in message


def test_get_lora_ops_triton_on_this_machine():
    try:
        ops = get_lora_ops("triton", "cpu")
    except ValueError as exc:
        assert "triton" in str(exc) and "not available" in str(exc)
    else:
        assert callable(ops.lora_shrink) and callable(ops.lora_expand)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_fused_ops_serve_every_slice_and_rank_class(form, dtype, fused_case):
    """The fused ops (slices of one output, several rank classes each) against the dense result,
    the torch path against the reference; rows without adapter are untouched bit for bit."""
    x, y0, problems, expected, unserved = fused_case(form, dtype, seed=5)
    groups = [TokenGroups.build(s, n, e) for _, _, s, n, e, _ in problems]
    a_pools = [p[0] for p in problems]
    b_pools = [p[1] for p in problems]
    cols = [p[5] for p in problems]
    dense_tol, pair_tol = (F32_TOL, F32_TOL) if dtype == torch.float32 else (F16_DENSE_TOL, F16_PAIR_TOL)
    outs = {}
    for ops in (lora_torch, lora_reference):
        y = y0.clone()
        xas = ops.lora_shrink_fused(x, a_pools, groups)
        assert [tuple(xa.shape) for xa in xas] == [(g.num_rows, a.shape[1]) for g, a in zip(groups, a_pools)]
        ops.lora_expand_fused(xas, b_pools, groups, y, cols)
        torch.testing.assert_close(y.float(), expected, **dense_tol)
        assert torch.equal(y[unserved], y0[unserved])
        outs[ops] = y
    torch.testing.assert_close(outs[lora_torch].float(), outs[lora_reference].float(), **pair_tol)


def test_fused_ops_refuse_mismatched_problem_lists():
    g = TokenGroups.build([0], [2], [0])
    x, a, b, y = torch.randn(3, 8), torch.randn(1, 4, 8), torch.randn(1, 5, 4), torch.randn(3, 5)
    with pytest.raises(ValueError):
        lora_torch.lora_shrink_fused(x, [a, a], [g])
    with pytest.raises(ValueError):
        lora_torch.lora_expand_fused([torch.randn(2, 4)], [b], [g], y, [0, 1])


@pytest.mark.parametrize("layout", ["single", "decode_in_order", "decode_gaps", "prefill", "prefill_gaps"])
def test_fused_problems_sharing_one_groups_object(layout):
    """Slices whose adapters share a layout get one `TokenGroups` object (as `LoraBatch` builds
    them): the shrink gathers and pads their rows once, and each slice still gets its own update
    (the one-segment form expands in place into its column slice)."""
    T, starts, lens, entries, _ = LAYOUTS[layout]
    g = TokenGroups.build(starts, lens, entries)
    served = _served(starts, lens, entries)
    x, a1, b1, y0 = _operands(T, 72, 40, 8, torch.float32, seed=2, extra_cols=(3, 56))
    _, a2, b2, _ = _operands(T, 72, 56, 4, torch.float32, seed=3)
    y = y0.clone()
    xas = lora_torch.lora_shrink_fused(x, [a1, a2], [g, g])
    lora_torch.lora_expand_fused(xas, [b1, b2], [g, g], y, [3, 43])
    expected = y0.float().clone()
    _, expected[:, 3:43] = _dense(x, a1, b1, y0[:, 3:43], served)
    _, expected[:, 43:99] = _dense(x, a2, b2, y0[:, 43:99], served)
    torch.testing.assert_close(y, expected, **F32_TOL)
    unserved = sorted(set(range(T)) - {row for row, _ in served})
    assert torch.equal(y[unserved], y0[unserved]) and torch.equal(y[:, :3], y0[:, :3])
