"""What the engine needs to know about a Llama-family model, read from its Hugging Face config."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter_format import projection_shapes

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Rope types whose frequencies do not depend on the sequence length at run time.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "proportional")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    inv_freq: torch.Tensor  # [head_dim // 2] rotary inverse frequencies
    rope_scaling: float  # attention scaling applied to cos/sin (1.0 for default rope)
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    name_or_path: str

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every projection a LoRA may target."""
        return projection_shapes(self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                                 self.head_dim)


def spec_from_hf_config(config, name_or_path: str = "") -> ModelSpec:
    """Build a ModelSpec from a `transformers` config, refusing what the engine does not run."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported: loraplex runs the Llama family "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    inv_freq, rope_scaling = _rope(config, head_dim)
    eos = config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return ModelSpec(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        hidden_act="silu",
        inv_freq=inv_freq,
        rope_scaling=rope_scaling,
        sliding_window=_sliding_window(config),
        eos_token_ids=eos_ids,
        bos_token_id=getattr(config, "bos_token_id", None),
        name_or_path=name_or_path,
    )


def _rope(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


def _sliding_window(config) -> int | None:
    """The attention window, when the model uses one on every layer (else None)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)
