"""Serving one adapter from merged weights: static (`--merge NAME`) or dynamic.

A merged copy of every layer the adapter touches holds W + scale·B·A (`kernels.merge`, into a
new buffer: the resident base weights are never modified; for a quantized base the copy is
dense, in the compute dtype). Requests for the merged adapter then skip their low-rank update.
Each step, the runner picks how the rest of the batch is served (`merge_mode`):
- "merged": every row uses the merged adapter, so every row runs on the merged copy;
- "split": merged rows on the merged copy, the other rows on the base weights plus their own
  update (two matmuls over the two row sets: the same FLOPs plus moving the rows);
- "correct": every row on the merged copy; the other rows also apply their own update minus the
  merged one, computed as the merged adapter's update of -x (still low-rank, on the same kernels).
Dynamic merging (`MergePolicy`) merges an adapter that holds at least `high` of the running
sequences for `patience` steps in a row, and unmerges when its share stays under `low` as long:
the gap and the patience keep it from flapping.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from loraplex.kernels import LoraOps

from .adapter_values import AdapterValueError
from .lora_batch import LoraBatch
from .lora_layer import LoraLinear
from .quantize import DenseLinear, dense_weight, layer_bias


@dataclass
class MergeStep:
    """How this step's rows use the merged copies."""

    mode: str  # "merged" | "split" | "correct"
    merged_rows: torch.Tensor | None = None  # split: rows of the merged adapter
    other_rows: torch.Tensor | None = None  # split: every other row
    correction: LoraBatch | None = None  # correct: the merged adapter's groups over the other rows


def merge_mode(num_merged: int, num_other: int, rank: int, quantized: bool) -> str | None:
    """The cheaper way to serve a batch with `num_merged` rows of the merged adapter (rank `rank`).

    Per layer, "split" moves every row once more (about n·(in+out) extra element moves) and
    "correct" runs a rank-r update over the other rows (about n_other·r·(in+out) multiply-adds):
    correct wins when n_other·r < n. On a quantized base the merged copy is dense, so "correct"
    would change the other rows' arithmetic: split there."""
    if num_merged == 0:
        return None
    if num_other == 0:
        return "merged"
    if not quantized and num_other * rank < num_merged + num_other:
        return "correct"
    return "split"


def build_merged(layer: LoraLinear, entries: dict[str, tuple[int, int]], ops: LoraOps,
                 dtype: torch.dtype) -> DenseLinear | None:
    """The merged copy of one (possibly fused) layer for the adapter whose pool entries are
    `entries` (projection -> (rank, entry)); None when it leaves this layer alone. Raises
    AdapterValueError when the copy is not finite (a merged adapter reaches every row)."""
    touched = []
    for name, (col, out) in layer.slices.items():
        if name not in entries:
            continue
        rank, entry = entries[name]
        a_pool, b_pool = layer.pools[name][rank]
        if torch.count_nonzero(b_pool[entry]) == 0:  # no weights in this layer (layers_to_transform)
            continue
        touched.append((col, out, a_pool[entry], b_pool[entry]))
    if not touched:
        return None
    base = dense_weight(layer.base, dtype)
    merged = torch.empty_like(base)
    merged.copy_(base)
    for col, out, a, b in touched:
        ops.merge(base[col : col + out], a, b, 1.0, merged[col : col + out])  # scale is folded into b
    if not bool(torch.isfinite(merged).all()):  # every row of a batch would read it
        raise AdapterValueError(f"its merged weight W + scale·B·A is not finite in {dtype}")
    bias = layer_bias(layer.base)
    prepack = isinstance(layer.base, DenseLinear) and layer.base.packed is not None
    return DenseLinear(merged, None if bias is None else bias.to(dtype), prepack)


class MergePolicy:
    """Decides when to merge which adapter (see the module docstring)."""

    def __init__(self, static: str | None = None, dynamic: bool = False, high: float = 0.75, low: float = 0.5,
                 patience: int = 8, min_running: int = 4) -> None:
        if not 0 < low < high <= 1:
            raise ValueError(f"dynamic merge thresholds need 0 < low < high <= 1, got low={low}, high={high}")
        self.static = static
        self.dynamic = dynamic
        self.high, self.low, self.patience, self.min_running = high, low, patience, min_running
        self._candidate: str | None = None
        self._streak = 0

    def decide(self, merged: str | None, running: list[str | None]) -> str | None:
        """The adapter that should be merged after this step's observation (None: none)."""
        if self.static is not None or not self.dynamic:
            return self.static
        counts = Counter(a for a in running if a is not None)
        top, top_count = counts.most_common(1)[0] if counts else (None, 0)
        if merged is not None:
            share = counts.get(merged, 0) / max(len(running), 1)
            want = None if share < self.low else merged
        elif len(running) >= self.min_running and top_count / len(running) >= self.high:
            want = top
        else:
            want = None
        if want == merged:
            self._candidate, self._streak = None, 0
            return merged
        if want != self._candidate:
            self._candidate, self._streak = want, 0
        self._streak += 1
        if self._streak >= self.patience:
            self._candidate, self._streak = None, 0
            return want
        return merged
