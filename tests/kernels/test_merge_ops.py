"""`merge(weight, a, b, scale, out)`: out = weight + scale * (b @ a), in the naive reference, the
PyTorch twin and the Triton kernel (on CPU in Triton's interpreter, see conftest.py).

`out` is always a separate buffer: the resident base weight is never modified (in half precision
merge-then-unmerge is not exact), and `out` may be a row slice of a fused weight.
"""
from __future__ import annotations

import pytest
import torch

from loraplex.kernels import lora_reference, lora_torch

# float32: all three accumulate the rank-r sum in float32 and differ only in its order; with
# |weight|, |scale * b @ a| = O(1) (a, b scaled by 1/sqrt(r)), atol/rtol 1e-5 is a few ulps.
F32_TOL = dict(atol=1e-5, rtol=1e-5)
# float16: each path computes the same float32 value up to summation order and rounds it once to
# float16, so results differ by at most one float16 ulp, which is <= 2**-10 (9.8e-4) of the value:
# rtol 1e-3, plus atol 1e-3 for values near zero.
F16_TOL = dict(atol=1e-3, rtol=1e-3)
# against the unrounded float32 product, a float16 result is off by at most half an ulp of the
# output plus the rounding of the inputs already in `weight`/`a`/`b` (exact: they are float16).
F16_DENSE_TOL = dict(atol=2e-3, rtol=1e-3)

SHAPES = [(40, 72, 3), (136, 200, 128), (17, 65, 1), (64, 48, 16)]  # (o, in, r)
DTYPES = [torch.float32, torch.float16]


def _operands(o, in_f, r, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(o, in_f, generator=gen).to(dtype)
    a = (torch.randn(r, in_f, generator=gen) / r**0.25).to(dtype)
    b = (torch.randn(o, r, generator=gen) / r**0.25).to(dtype)
    return weight, a, b


def _implementations():
    impls = [("reference", lora_reference), ("torch", lora_torch)]
    try:
        import triton  # noqa: F401

        from loraplex.kernels import lora_triton
    except ImportError:  # the Triton path is optional; reference and torch still get tested
        return impls
    return impls + [("triton", lora_triton)]


IMPLS = _implementations()


def _on(device, name, *tensors):
    """Copies of the tensors on the device the implementation runs on (only Triton may use a GPU)."""
    target = device if name == "triton" else torch.device("cpu")
    return tuple(t.to(target, copy=True) for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("o,in_f,r", SHAPES, ids=lambda v: str(v))
def test_merge_paths_agree(o, in_f, r, dtype, triton_device):
    weight, a, b = _operands(o, in_f, r, dtype, seed=o * 7 + r)
    scale = 0.75
    dense = weight.float() + scale * (b.float() @ a.float())
    tol, dense_tol = (F32_TOL, F32_TOL) if dtype == torch.float32 else (F16_TOL, F16_DENSE_TOL)
    results = {}
    for name, ops in IMPLS:
        w, a_, b_, out = _on(triton_device, name, weight, a, b, torch.full_like(weight, float("nan")))
        w_before = w.clone()
        ops.merge(w, a_, b_, scale, out)
        assert torch.equal(w, w_before), f"{name} modified weight"  # bit for bit
        assert out.dtype == dtype and out.shape == (o, in_f)
        results[name] = out.cpu()
        torch.testing.assert_close(results[name].float(), dense, **dense_tol, msg=lambda m: f"{name}: {m}")
    for name, out in results.items():
        torch.testing.assert_close(out, results["reference"], **tol, msg=lambda m: f"{name} vs reference: {m}")


@pytest.mark.parametrize("name", [n for n, _ in IMPLS])
def test_merge_into_a_row_slice_of_a_fused_buffer(name, triton_device):
    """out is rows [col, col + o) of a bigger contiguous weight: only those rows change."""
    ops = dict(IMPLS)[name]
    o, in_f, r, col = 40, 72, 3, 24
    weight, a, b = _operands(o, in_f, r, torch.float32, seed=5)
    fused0 = torch.randn(24 + o + 16, in_f)
    (fused,) = _on(triton_device, name, fused0.clone())
    w, a_, b_ = _on(triton_device, name, weight, a, b)
    ops.merge(w, a_, b_, 2.0, fused[col : col + o])
    fused = fused.cpu()
    assert torch.equal(fused[:col], fused0[:col]) and torch.equal(fused[col + o :], fused0[col + o :])
    torch.testing.assert_close(fused[col : col + o], weight + 2.0 * (b @ a), **F32_TOL)


@pytest.mark.parametrize("name", [n for n, _ in IMPLS])
def test_merge_from_a_slice_of_the_fused_base_as_the_engine_does(name, triton_device):
    """As merging.build_merged: weight and out are the same rows of two fused buffers; a and b
    are entries of the pools; scale 1 (folded into b); the base stays bit-identical."""
    ops = dict(IMPLS)[name]
    in_f, outs, r = 72, [40, 24, 24], 8
    base0 = torch.randn(sum(outs), in_f)
    a_pool = torch.randn(3, r, in_f) / r**0.5
    b_pool = torch.randn(3, sum(outs), r) / r**0.5
    base, merged, a_pool_d, b_pool_d = _on(triton_device, name, base0, base0.clone(), a_pool, b_pool)
    col = 0
    for k, out in enumerate(outs):
        if k != 1:  # the middle projection has no adapter: its rows stay the base's
            ops.merge(base[col : col + out], a_pool_d[k], b_pool_d[k, col : col + out], 1.0, merged[col : col + out])
        col += out
    base, merged = base.cpu(), merged.cpu()
    assert torch.equal(base, base0)
    assert torch.equal(merged[40:64], base0[40:64])
    torch.testing.assert_close(merged[:40], base0[:40] + b_pool[0, :40] @ a_pool[0], **F32_TOL)
    torch.testing.assert_close(merged[64:], base0[64:] + b_pool[2, 64:] @ a_pool[2], **F32_TOL)


@pytest.mark.parametrize("scale", [0.0, -1.5])
def test_merge_scale(scale, triton_device):
    weight, a, b = _operands(40, 72, 3, torch.float32, seed=9)
    for name, ops in IMPLS:
        w, a_, b_, out = _on(triton_device, name, weight, a, b, torch.empty_like(weight))
        ops.merge(w, a_, b_, scale, out)
        if scale == 0.0:
            assert torch.equal(out.cpu(), weight), name
        torch.testing.assert_close(out.cpu(), weight + scale * (b @ a), **F32_TOL)


# Triton argument checks -------------------------------------------------------------------


def _bad_merges(device):
    w, a, b, out = torch.randn(40, 72), torch.randn(3, 72), torch.randn(40, 3), torch.empty(40, 72)
    w, a, b, out = (t.to(device) for t in (w, a, b, out))
    return [
        ("weight-1d", lambda m: m(w[0], a, b, 1.0, out), ["weight", "2-D"]),
        ("out-shape", lambda m: m(w, a, b, 1.0, out[:39]), ["out", "(39, 72)", "(40, 72)"]),
        ("a-in", lambda m: m(w, a[:, :70], b, 1.0, out), ["a", "weight", "in=70", "in=72", "(3, 70)"]),
        ("b-rows", lambda m: m(w, a, b[:39], 1.0, out), ["b", "weight", "o=39", "o=40", "(39, 3)"]),
        ("rank", lambda m: m(w, a[:2], b, 1.0, out), ["rank", "r=3", "r=2", "(40, 3)", "(2, 72)"]),
        ("a-b-dtype", lambda m: m(w, a.half(), b, 1.0, out), ["b", "torch.float32", "torch.float16"]),
        ("int-weight", lambda m: m(w.long(), a, b, 1.0, out), ["weight", "torch.int64"]),
    ]


_BAD_IDS = [c[0] for c in _bad_merges(torch.device("cpu"))]


@pytest.mark.parametrize("case", range(len(_BAD_IDS)), ids=_BAD_IDS)
def test_triton_merge_bad_arguments_raise_value_error(case, triton_device):
    impls = dict(IMPLS)
    if "triton" not in impls:
        pytest.skip("triton is not installed")
    _, call, words = _bad_merges(triton_device)[case]
    with pytest.raises(ValueError) as info:
        call(impls["triton"].merge)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
