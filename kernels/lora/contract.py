"""`LoraOps`: the contract the three paths of the LoRA ops share (`lora_reference`, the test
oracle; `lora_torch`, CPU serving; `lora_triton`, GPU serving). `get_lora_ops` returns one of
those modules; a module satisfies this Protocol structurally, so callers type against the
contract, never against one path. Each path's docstrings give the meaning as pseudocode; the
shapes are repeated here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .lora_groups import TokenGroups


class LoraOps(Protocol):
    def lora_shrink(self, x: torch.Tensor, a_pool: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
        """x [T, in], a_pool [S, r, in] -> xa [n, r]: each served row times its own adapter's A."""

    def lora_expand(self, xa: torch.Tensor, b_pool: torch.Tensor, groups: TokenGroups, y: torch.Tensor) -> None:
        """xa [n, r], b_pool [S, out, r]: y[row] += B @ xa for each served row, in place."""

    def lora_shrink_fused(self, x: torch.Tensor, a_pools: Sequence[torch.Tensor],
                          groups: Sequence[TokenGroups]) -> list[torch.Tensor]:
        """lora_shrink for several problems (slices of a fused projection, rank classes) of one x."""

    def lora_expand_fused(self, xas: Sequence[torch.Tensor], b_pools: Sequence[torch.Tensor],
                          groups: Sequence[TokenGroups], y: torch.Tensor, cols: Sequence[int]) -> None:
        """lora_expand for several problems into the column ranges cols[p] .. cols[p] + out_p of y."""

    def merge(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
              out: torch.Tensor) -> None:
        """out [o, in] = weight [o, in] + scale * (b [o, r] @ a [r, in])."""
