"""The engine's own Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM2).

Tokens of all sequences in a step are flattened into one [T, hidden] batch. Per layer the
base projections run once for the whole batch (q/k/v fused, gate/up fused) and every token
adds its own adapter's low-rank update (`LoraLinear`). Soft-prompt vectors replace the
embeddings of their virtual positions.

The forward pass also says which rows stayed finite (`finite_rows`): every row of the final
hidden state, and the logits of the rows that have them. A row is a token of one sequence, and
nothing mixes rows except attention within a sequence (masked positions hold zeros, see
attention.py), so a row that went non-finite fails only its own sequence (engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_format import FUSED, module_name
from .attention import AttentionMetadata, attention, write_kv
from .lora_batch import LoraBatch
from .lora_layer import LoraLinear
from .merging import MergeStep
from .model_config import ModelSpec
from .quantize import DenseLinear, make_linear


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long (virtual positions hold any valid id)
    positions: torch.Tensor  # [T] long
    attn: AttentionMetadata
    lora: LoraBatch | None
    logit_rows: torch.Tensor  # [R] rows whose logits are wanted
    soft_rows: torch.Tensor | None = None  # [n] rows that take a soft-prompt vector
    soft_vectors: torch.Tensor | None = None  # [n, hidden]
    merge: MergeStep | None = None  # how rows use merged copies this step


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As Hugging Face's LlamaRMSNorm: normalise in float32, scale in the input dtype. In float32
    that is one fused op (six eager ops cost more than the arithmetic at decode sizes); other
    dtypes keep HF's rounding to the input dtype before the scale."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd], cos/sin [T, 1, hd] (the two halves rotate together)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, projections: dict[str, LoraLinear], norms: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        self.proj = nn.ModuleDict(projections)
        self.input_norm = nn.Parameter(norms[0], requires_grad=False)
        self.post_norm = nn.Parameter(norms[1], requires_grad=False)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        s = self.spec
        num_tokens = h.shape[0]
        qkv = self.proj["qkv_proj"](rms_norm(h, self.input_norm, s.rms_norm_eps), batch.lora, batch.merge)
        # q and k rotate in one pass: their columns are adjacent, heads then kv heads
        qk = apply_rope(qkv[:, : s.q_size + s.kv_size].view(num_tokens, s.num_heads + s.num_kv_heads, s.head_dim),
                        cos, sin)
        q, k = qk[:, : s.num_heads], qk[:, s.num_heads :]
        v = qkv[:, s.q_size + s.kv_size :].reshape(num_tokens, s.num_kv_heads, s.head_dim)
        write_kv(kv[0], kv[1], k, v, batch.attn.kv_positions)
        o = attention(q, k, v, kv[0], kv[1], batch.attn)
        h = h + self.proj["o_proj"](o, batch.lora, batch.merge)
        gate_up = self.proj["gate_up_proj"](rms_norm(h, self.post_norm, s.rms_norm_eps), batch.lora, batch.merge)
        gate, up = gate_up.split([s.intermediate_size, s.intermediate_size], dim=-1)
        return h + self.proj["down_proj"](F.silu(gate) * up, batch.lora, batch.merge)


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], quantize: str, device: torch.device,
                 max_positions: int, prepack: bool = False) -> None:
        """weights: Hugging Face names (model.layers.{i}.self_attn.q_proj.weight, ...), compute dtype;
        prepack: hold unquantized projections and the lm_head in oneDNN's layout (`DenseLinear`)."""
        super().__init__()
        self.spec = spec
        self.embed = nn.Parameter(weights.pop("model.embed_tokens.weight").to(device), requires_grad=False)
        lm_head = weights.pop("lm_head.weight", None)
        # a tied head shares the embedding's storage unless prepacked (then it is a second copy)
        self.lm_head = DenseLinear(self.embed if lm_head is None else lm_head.to(device), None, prepack)
        self.norm = nn.Parameter(weights.pop("model.norm.weight").to(device), requires_grad=False)
        self.layers = nn.ModuleList(
            _build_layer(spec, weights, i, quantize, device, prepack) for i in range(spec.num_layers)
        )
        leftover = [k for k in weights if "rotary_emb" not in k]
        if leftover:
            raise ValueError(f"unexpected weights in the model: {', '.join(sorted(leftover)[:5])}")
        pos = torch.arange(max_positions, dtype=torch.float)
        freqs = pos[:, None] * spec.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed.dtype
        self.register_buffer("cos", (emb.cos() * spec.rope_scaling).to(dtype).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * spec.rope_scaling).to(dtype).to(device), persistent=False)
        self.eval()  # inference only (bitsandbytes picks its inference kernels on eval modules)

    def lora_layers(self) -> list[LoraLinear]:
        return [p for layer in self.layers for p in layer.proj.values()]

    def forward(self, batch: ForwardBatch, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [R, vocab] float32 for batch.logit_rows, finite [T] bool: per row, whether its
        final hidden state and (for logit rows) its logits are finite, see `finite_rows`)."""
        h = self.embed.index_select(0, batch.input_ids)
        if batch.soft_rows is not None:
            h.index_copy_(0, batch.soft_rows, batch.soft_vectors.to(h.dtype))
        cos = self.cos.index_select(0, batch.positions)[:, None, :]
        sin = self.sin.index_select(0, batch.positions)[:, None, :]
        for layer, kv in zip(self.layers, kv_cache):
            h = layer(h, cos, sin, batch, kv)
        finite = finite_rows(h)
        h = rms_norm(h.index_select(0, batch.logit_rows), self.norm, self.spec.rms_norm_eps)
        logits = self.lm_head(h).float()
        finite[batch.logit_rows] &= torch.isfinite(logits.sum(-1))  # NaN or ±inf anywhere in the row
        return logits, finite


def finite_rows(h: torch.Tensor) -> torch.Tensor:
    """h [T, D] -> [T] bool: whether each row's sum of squares is finite in float32. That is what
    RMSNorm divides by: False for NaN and inf, and for values so large (|h| ~ 1e19) that the norm
    overflows and quietly returns zeros instead of the row's direction."""
    hf = h.float()
    return torch.isfinite(torch.linalg.vecdot(hf, hf))


def _build_layer(spec: ModelSpec, weights: dict[str, torch.Tensor], i: int, quantize: str, device: torch.device,
                 prepack: bool) -> DecoderLayer:
    prefix = f"model.layers.{i}."
    shapes = spec.projection_shapes()
    projections = {}
    for fused, names in FUSED.items():
        keys = [module_name(i, n) for n in names]
        ws = [weights.pop(k + ".weight") for k in keys]
        bs = [weights.pop(k + ".bias", None) for k in keys]
        for name, w in zip(names, ws):
            if tuple(w.shape) != shapes[name]:
                raise ValueError(f"{prefix}{name} has shape {list(w.shape)}, the config implies {list(shapes[name])}")
        base = make_linear(ws, bs, quantize, device, prepack)
        projections[fused] = LoraLinear(base, [(n, shapes[n][0]) for n in names], in_features=shapes[names[0]][1])
    norms = (
        weights.pop(prefix + "input_layernorm.weight").to(device),
        weights.pop(prefix + "post_attention_layernorm.weight").to(device),
    )
    return DecoderLayer(spec, projections, norms)
