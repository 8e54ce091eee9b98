"""The LoRA-aware projection: the base weights once for the whole batch, then each token's own
adapter's low-rank update, grouped by rank class (see `lora_batch`).

A layer may fuse several projections of one input (q/k/v, gate/up): the base is one matmul
and each projection (a "slice" of the output columns) has its own rank pools.
"""
from __future__ import annotations

import torch
from torch import nn

from .lora_batch import LoraBatch


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, slices: list[tuple[str, int]], in_features: int) -> None:
        """slices: (projection name, out_features) in output-column order."""
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.slices: dict[str, tuple[int, int]] = {}  # projection -> (first column, out_features)
        col = 0
        for name, out in slices:
            self.slices[name] = (col, out)
            col += out
        self.merged: nn.Module | None = None  # W + scale·B·A of the merged adapter (see merging.py)
        # projection -> rank -> (A pool [cap, r, in], scale * B pool [cap, out, r]), PEFT's layout
        self.pools: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {name: {} for name in self.slices}

    def forward(self, x: torch.Tensor, lora: LoraBatch | None, merge=None) -> torch.Tensor:
        """x [T, in] -> y [T, sum(out)]; `lora` carries the step's groups and the ops that apply them.
        `merge` (a merging.MergeStep) says how rows use the merged copy, when this layer has one;
        rows of the merged adapter are absent from `lora`."""
        if merge is None or self.merged is None:
            y = self.base(x)
        elif merge.mode == "split":
            y = x.new_empty(x.shape[0], self.out_features)
            y.index_copy_(0, merge.merged_rows, self.merged(x.index_select(0, merge.merged_rows)))
            y.index_copy_(0, merge.other_rows, self.base(x.index_select(0, merge.other_rows)))
        else:
            y = self.merged(x)
            if merge.mode == "correct":  # the others remove the merged update: its update of -x
                self._add_updates(-x, merge.correction, y)
        self._add_updates(x, lora, y)
        return y

    def _add_updates(self, x: torch.Tensor, lora: LoraBatch | None, y: torch.Tensor) -> None:
        """y [T, sum(out)] += every row's own low-rank update of x [T, in], on `lora.ops`: one fused
        shrink and one fused expand serve every slice and every rank class of this layer (one
        launch each on the Triton path)."""
        if lora is None:
            return
        a_pools, b_pools, groups, cols = [], [], [], []
        for name, (col, _) in self.slices.items():
            for rank, g in lora.groups.get(name, ()):
                a_pool, b_pool = self.pools[name][rank]
                a_pools.append(a_pool)
                b_pools.append(b_pool)
                groups.append(g)
                cols.append(col)
        if groups:
            xas = lora.ops.lora_shrink_fused(x, a_pools, groups)  # xas[p] [n_p, r_p]
            lora.ops.lora_expand_fused(xas, b_pools, groups, y, cols)

    @property
    def out_features(self) -> int:
        return sum(out for _, out in self.slices.values())

    def ensure_capacity(self, name: str, rank: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        """Grow (or create) the rank-`rank` pools of projection `name` to `capacity` entries."""
        out = self.slices[name][1]
        old = self.pools[name].get(rank)
        if old is not None and old[0].shape[0] >= capacity:
            return
        # uninitialised: a `plan_write` fills a whole entry (the adapter's columns, zeros past its
        # rank) and only written entries are read, so growing touches no memory for unused entries
        a = torch.empty(capacity, rank, self.in_features, dtype=dtype, device=device)
        b = torch.empty(capacity, out, rank, dtype=dtype, device=device)
        if old is not None:
            a[: old[0].shape[0]] = old[0]
            b[: old[1].shape[0]] = old[1]
        self.pools[name][rank] = (a, b)

    def plan_write(self, name: str, rank: int, entry: int, a: torch.Tensor | None, b: torch.Tensor | None
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """How to store one adapter's A [r_i, in] and scaled B [out, r_i] (r_i <= rank; the rest is
        zero) in `entry`: (destination, source) copies and destinations to zero, for `store`. None
        means the adapter leaves this projection of this layer alone: the entry is zeroed. Only the
        part no copy covers needs zeros."""
        a_pool, b_pool = self.pools[name][rank]
        r = 0 if a is None else a.shape[0]
        zeros = [a_pool[entry, r:], b_pool[entry, :, r:]] if r < rank else []
        copies = [(a_pool[entry, :r], a), (b_pool[entry, :, :r], b)] if r else []
        return copies, zeros


def store(copies: list[tuple[torch.Tensor, torch.Tensor]], zeros: list[torch.Tensor]) -> None:
    """Carry out `plan_write` plans, a whole adapter's at once: every copy in one torch call and
    every zero fill in another. Hundreds of small copies would each hand the GIL to the background
    adapter reader and wait to get it back (a low-priority thread the OS may have set aside): a
    10 ms copy took 50-140 ms while reads ran."""
    if copies:
        torch._foreach_copy_([dst for dst, _ in copies], [src for _, src in copies])
    if zeros:
        torch._foreach_zero_(zeros)
