"""The Llama-family adapter format in one place: projection names, blocks, fused groups, keys, shapes.

A LoRA adapter, the base weights it is checked against and the engine's fused layers all name
the same seven projections, in the same two blocks of a decoder layer, under Hugging Face's key
spelling. Those names were once spelled in four modules (the validator, the forward pass, the
merge exporter and the model config), each with its own "is this an mlp projection?" test, so a
new projection or block had to be taught to all four alike. They are spelled here only:

* :data:`PROJECTIONS`, in a layer's order, and :data:`BLOCK_OF`, the block each one lives in;
* :data:`FUSED`, which projections the forward pass runs as one base matmul (q/k/v, gate/up);
* :func:`module_name` and :func:`weight_key`, Hugging Face's names of one projection, and
  :data:`LORA_KEY`, the pattern of PEFT's LoRA tensor names;
* :func:`projection_shapes`, every projection's weight shape from a model's sizes, and
  :class:`BaseModelShape`, what an adapter must fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .adapter_errors import is_int

__all__ = [
    "ATTENTION_PROJECTIONS",
    "MLP_PROJECTIONS",
    "PROJECTIONS",
    "BLOCK_OF",
    "FUSED",
    "LORA_KEY",
    "module_name",
    "weight_key",
    "projection_shapes",
    "BaseModelShape",
]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
BLOCK_OF = {**dict.fromkeys(ATTENTION_PROJECTIONS, "self_attn"), **dict.fromkeys(MLP_PROJECTIONS, "mlp")}

# Which fused layer holds each projection, in output-column order.
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}

# PEFT's name of a LoRA tensor: [base_model.model.]model.layers.N.BLOCK.PROJ.lora_(A|B)[.ADAPTER].weight
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]\w*)\.(?P<proj>[A-Za-z_]\w*)"
    r"\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$"
)


def module_name(layer: int, proj: str) -> str:
    """Hugging Face's (and PEFT's) name of one projection: ``model.layers.3.self_attn.q_proj``."""
    return f"model.layers.{layer}.{BLOCK_OF[proj]}.{proj}"


def weight_key(layer: int, proj: str) -> str:
    """The base weight's key in a Hugging Face state dict: ``model.layers.3.mlp.up_proj.weight``."""
    return f"{module_name(layer, proj)}.weight"


def projection_shapes(
    hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int
) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every projection a LoRA may target, in :data:`PROJECTIONS` order."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (q, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, q),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: layer count, hidden size and each projection's weight shape.

    ``projection_shapes[proj]`` is ``(out_features, in_features)``, the shape of the base
    ``nn.Linear`` weight, for every name in :data:`PROJECTIONS`.
    """

    num_layers: int
    hidden_size: int
    projection_shapes: dict[str, tuple[int, int]]
    name_or_path: str = ""

    def __post_init__(self) -> None:
        missing = [p for p in PROJECTIONS if p not in self.projection_shapes]
        if missing:
            raise ValueError(f"BaseModelShape.projection_shapes lacks {missing}")
        for proj in PROJECTIONS:
            shape = tuple(self.projection_shapes[proj])
            if len(shape) != 2 or not all(is_int(d) and d > 0 for d in shape):
                raise ValueError(f"BaseModelShape.projection_shapes[{proj!r}] = {shape!r} is not (out, in)")
        if not (is_int(self.num_layers) and self.num_layers > 0):
            raise ValueError(f"BaseModelShape.num_layers must be a positive int, got {self.num_layers!r}")
        if not (is_int(self.hidden_size) and self.hidden_size > 0):
            raise ValueError(f"BaseModelShape.hidden_size must be a positive int, got {self.hidden_size!r}")

    @classmethod
    def from_hf_config(cls, config: Any, name_or_path: str | None = None) -> "BaseModelShape":
        """Shape of a Llama-family model from its ``transformers`` config (LlamaConfig and kin)."""
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        shapes = projection_shapes(hidden, int(config.intermediate_size), heads, kv_heads, head_dim)
        if name_or_path is None:
            name_or_path = getattr(config, "_name_or_path", "") or ""
        return cls(int(config.num_hidden_layers), hidden, shapes, name_or_path)
