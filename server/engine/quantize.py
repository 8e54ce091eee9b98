"""Base linear layers: plain dense weights, or bitsandbytes NF4 / FP4 / int8 (CPU and GPU alike).

The quantized layers are built exactly as `transformers` builds them for a
`BitsAndBytesConfig` (blocksize 64, no double quantization, int8 outlier threshold 6.0),
so the engine and a Hugging Face model quantized from the same weights hold the same bits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
INT8_THRESHOLD = 6.0


class DenseLinear(nn.Module):
    """y = x @ W^T + b with W [out, in].

    With `prepack`, W is held only in oneDNN's blocked layout, reordered once at load (what
    PyTorch's inductor does for frozen CPU linears). Decode-sized matmuls then run about twice
    as fast as `F.linear` on this project's CPUs (docs/BENCHMARKS.md); the arithmetic is float32
    (or bfloat16) as before, only the summation order differs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool = False) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        if prepack:
            self.weight = None
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def dense(self) -> torch.Tensor:
        """W [out, in] in plain layout (a new tensor when prepacked)."""
        return self.packed.to_dense() if self.packed is not None else self.weight.detach()


PACK_BATCH_HINT = 32  # rows oneDNN tunes the packed layout for; any row count works


def prepack_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `DenseLinear(prepack=True)` can run here: oneDNN on a CPU, float32 or bfloat16."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class ConcatLinear(nn.Module):
    """Several quantized projections of one input, outputs concatenated (the quantized twin of a
    fused dense weight: each part keeps its own quantization blocks, as in the unfused model)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def make_linear(
    weights: list[torch.Tensor], biases: list[torch.Tensor | None], quantize: str, device: torch.device,
    prepack: bool = False,
) -> nn.Module:
    """One (possibly fused) projection from per-slice weights [out_i, in] and biases [out_i];
    `prepack` applies to unquantized layers (see `DenseLinear`)."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if quantize == "none":
        weight = torch.cat(weights, 0) if len(weights) > 1 else weights[0]
        if all(b is None for b in biases):
            bias = None
        else:
            bias = torch.cat([b if b is not None else weight.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        return DenseLinear(weight.to(device).contiguous(), None if bias is None else bias.to(device), prepack)
    parts = [_quantized(w, b, quantize, device) for w, b in zip(weights, biases)]
    return parts[0] if len(parts) == 1 else ConcatLinear(parts)


def _quantized(weight: torch.Tensor, bias: torch.Tensor | None, quantize: str, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    has_bias = bias is not None
    if quantize in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=has_bias, compute_dtype=weight.dtype,
            quant_type=quantize, compress_statistics=False, device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.contiguous(), requires_grad=False, quant_type=quantize, compress_statistics=False
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False,
            threshold=INT8_THRESHOLD, device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        # bitsandbytes' packed CPU kernel rounds activations to bfloat16, so a request's result
        # would depend on which other requests share its batch: keep the float path.
        layer.support_avx512bf16_for_cpu = False
    layer = layer.to(device)
    layer.out_features = out_features
    return layer


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight [out, in] as a dense tensor in `dtype` (dequantized when quantized):
    the starting point of a merged copy. A new tensor; the layer itself is left as it is."""
    if isinstance(module, DenseLinear):
        return module.dense().to(dtype).clone()
    if isinstance(module, ConcatLinear):
        return torch.cat([dense_weight(p, dtype) for p in module.parts])
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return (weight.data.float() * weight.SCB.float()[:, None] / 127.0).to(dtype)


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The layer's bias [out] (None when it has none), fused layers' parts concatenated."""
    if isinstance(module, ConcatLinear):
        biases = [layer_bias(p) for p in module.parts]
        if all(b is None for b in biases):
            return None
        return torch.cat([b if b is not None else torch.zeros(p.out_features) for p, b in zip(module.parts, biases)])
    return None if module.bias is None else module.bias.detach()
