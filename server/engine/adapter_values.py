"""What an adapter's numbers may be: finite, and not absurd for the base model they are added to.

The header checks (`adapters.py`) say an adapter *fits*; these say its values are *sane*. An
adapter whose lora_B is NaN or inf, or finite but huge (1e30), or whose lora_alpha is 1e308, fits
perfectly, and one request on it used to write non-finite values into KV blocks that other
tenants' requests later read. So:

- every tensor, after PEFT's scale is folded into B (in the serving dtype: a finite B times a huge
  scale can overflow there), must be finite;
- per module, the update scale·B·A must stay within `MAX_UPDATE_RATIO` times the base weight's
  Frobenius norm: ||scale·B·A||_F <= 100·||W||_F. A fine-tune moves a weight by a fraction of
  its norm (the LoRA paper measured ||ΔW_q||_F = 6.91 against ||W_q||_F = 61.95 on GPT-3, about
  0.1x); the tests' random adapters reach 0.3-1.7x (conftest's, entries of 0.15-0.3) and 14-28x
  (entries of 1, rank 16 to 64). Past 100x the base weight hardly matters any more: a broken
  export or a wrong lora_alpha, not a fine-tune;
- a soft prompt's every virtual-token vector must be finite and at most `MAX_SOFT_PROMPT_RATIO`
  times the longest token embedding of the base (the vectors it stands in for; conftest's random
  soft prompt is 3x).

The bound is checked cheaply: ||B||_F·||A||_F bounds ||B·A||_F from above, so one norm per tensor
(a single pass, which also finds NaN and inf: their norm is not finite) settles almost every
module; only a module over the bound, or whose norms are not finite, is looked at exactly
(finiteness, then ||B·A||_F from the two small r×r Gram matrices, in float64).

These checks run when an adapter is registered and every time one is read for a slot (the file
could change under a name). The engine does not rely on them alone: see `model_runner.py` for
what happens when values go non-finite anyway.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .adapter_errors import AdapterError
from .adapter_format import PROJECTIONS, module_name, weight_key
from .adapters import LoraAdapter, SoftPrompt
from .safetensors_file import slices_of

MAX_UPDATE_RATIO = 100.0
MAX_SOFT_PROMPT_RATIO = 100.0


class AdapterValueError(AdapterError):
    """An adapter whose values are not finite, or absurd for the base model (see the module doc)."""


@dataclass(frozen=True)
class BaseNorms:
    """The base model's sizes that adapter values are measured against."""

    weights: dict[tuple[int, str], float]  # (layer, projection) -> ||W||_F
    embedding_row: float  # the longest token embedding (L2 norm)

    @classmethod
    def of(cls, weights: dict[str, torch.Tensor], num_layers: int) -> "BaseNorms":
        """From Hugging Face-named weights (model.layers.{i}.self_attn.q_proj.weight, ...)."""
        norms = {}
        for layer in range(num_layers):
            for proj in PROJECTIONS:
                w = weights[weight_key(layer, proj)]
                norms[(layer, proj)] = float(torch.linalg.vector_norm(w, dtype=torch.float32))
        embed = weights["model.embed_tokens.weight"]
        row = float(torch.linalg.vector_norm(embed, dim=-1, dtype=torch.float32).max())
        return cls(norms, row)


def check_values(adapter: LoraAdapter | SoftPrompt, norms: BaseNorms,
                 pace: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """Raise AdapterValueError when `adapter` (as loaded: B already scaled) is not servable on the
    base `norms` describe. The work runs in ~1 MB pieces, each inside `with pace():`."""
    where = f"adapter {adapter.path}"
    if isinstance(adapter, SoftPrompt):
        with pace():
            check_soft_prompt(adapter.embeddings, norms.embedding_row, where)
        return
    modules = sorted(adapter.weights.items())
    for group in slices_of(modules, lambda item: item[1][0].nbytes + item[1][1].nbytes):
        with pace():
            for (layer, proj), (a, b) in group:
                scale = adapter.scales.get((layer, proj))
                check_update(a, b, norms.weights[(layer, proj)], f"{where}: {module_name(layer, proj)}", scale)


def check_update(a: torch.Tensor, b: torch.Tensor, base_norm: float, what: str, scale: float | None = None) -> None:
    """One module: A [r, in] and scale·B [out, r] finite, ||scale·B·A||_F within the bound.
    `scale` (PEFT's, already folded into B) is only quoted in the message."""
    limit = MAX_UPDATE_RATIO * base_norm
    bound = float(torch.linalg.vector_norm(a, dtype=torch.float32)) * float(
        torch.linalg.vector_norm(b, dtype=torch.float32))
    if bound <= limit:  # also false for NaN
        return
    scaled = "" if scale is None else f" (scale {scale:.6g})"
    for name, t in (("lora_A", a), ("lora_B times its scale", b)):
        if not bool(torch.isfinite(t).all()):
            raise AdapterValueError(
                f"{what}: {name} holds NaN or infinite values{scaled}; such an adapter would poison the KV "
                "cache. Fix the weights (and lora_alpha) and register it again")
    norm = update_norm(a, b)
    if norm > limit:
        ratio = norm / base_norm if base_norm else float("inf")
        raise AdapterValueError(
            f"{what}: the update scale·B·A has Frobenius norm {norm:.3g}, {ratio:.3g}x the base "
            f"weight's {base_norm:.3g}{scaled}; loraplex refuses updates over {MAX_UPDATE_RATIO:g}x "
            "the base weight, which no real fine-tune comes near. Check lora_alpha and the weights")


def update_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """||B·A||_F without forming B·A: sqrt(sum((Bᵀ·B) ⊙ (A·Aᵀ))), in float64 (inf when it
    overflows even there)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    squared = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    return max(squared, 0.0) ** 0.5 if squared == squared else float("inf")


def check_soft_prompt(embeddings: torch.Tensor, longest_token: float, where: str) -> None:
    """Every vector [num_virtual, hidden] finite and within the bound (see the module doc)."""
    lengths = torch.linalg.vector_norm(embeddings, dim=-1, dtype=torch.float64)  # [num_virtual]
    if not bool(torch.isfinite(embeddings).all()):
        raise AdapterValueError(
            f"{where}: prompt_embeddings holds NaN or infinite values; fix the vectors and register it again")
    limit = MAX_SOFT_PROMPT_RATIO * longest_token
    if bool((lengths > limit).any()):
        worst = float(lengths.max())
        ratio = worst / longest_token if longest_token else float("inf")
        raise AdapterValueError(
            f"{where}: a prompt_embeddings vector has L2 norm {worst:.3g}, {ratio:.3g}x the "
            f"longest token embedding of the base ({longest_token:.3g}); loraplex refuses soft-prompt vectors over "
            f"{MAX_SOFT_PROMPT_RATIO:g}x it. Check the prompt-tuning export")
