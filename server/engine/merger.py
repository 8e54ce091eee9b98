"""The one owner of merged serving: which adapter is merged, and every step that follows from it.

The state of merged serving used to live in three places at once: the engine held the policy,
the merged adapter's name, whether it had pinned it, and the switch count; the runner held the
merged slot and rank and planned each batch; merging.py held the arithmetic. A change to one
(say, what unregistering a merged adapter does) had to be made in step in all three. Now
`Merger` holds all of it and takes each step: `merge`, `unmerge`, `forget` (the adapter is
leaving), `wanted` (what the dynamic policy asks for now) and `plan` (how one batch uses the
merged copies). The engine asks it; the model runner holds it and asks `plan` once per batch.
The arithmetic (`build_merged`, `merge_mode`) and the policy's decision stay in merging.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels import LoraOps

from .adapter_errors import AdapterError
from .adapter_slots import AdapterSlots
from .adapter_values import AdapterValueError
from .lora_batch import LoraBatch
from .lora_layer import LoraLinear
from .merging import MergePolicy, MergeStep, build_merged, merge_mode
from .quantize import DenseLinear


@dataclass(frozen=True)
class MergePlan:
    """How one batch's sequences are served, given what is merged."""

    lora_slots: list[int]  # per sequence, the slot of its low-rank update (-1: none, it is served merged)
    step: MergeStep | None  # how the batch's rows use the merged copies (None: nothing merged is used)


class Merger:
    def __init__(self, layers: list[LoraLinear], slots: AdapterSlots, ops: LoraOps, dtype: torch.dtype,
                 device: torch.device, quantized: bool, policy: MergePolicy) -> None:
        """`layers`: every LoraLinear of the model (each gets a merged copy or None); `quantized`: the
        base is quantized, so its merged copies are dense (see `merge_mode`)."""
        self.policy = policy
        self.merged: str | None = None  # the adapter served from merged copies
        self.switches = 0  # merges and unmerges so far
        self.last_mode: str | None = None  # how the last planned batch used the merged copies
        self._layers = layers
        self._slots = slots
        self._ops = ops
        self._dtype = dtype
        self._device = device
        self._quantized = quantized
        self._slot: int | None = None  # the merged adapter's slot
        self._rank = 0  # its largest rank
        self._pinned_here = False  # it was pinned for the merge (and is unpinned with it)

    # merging -----------------------------------------------------------------------------
    def merge(self, name: str, static: bool = False) -> None:
        """Serve LoRA adapter `name` from merged copies of the layers it touches, unmerging the one
        merged before; static: keep it merged (the dynamic policy then leaves it alone). Raises
        AdapterError when it is not a servable LoRA adapter, and AdapterValueError when its values
        (device copy, or merged weights) are not servable: then nothing is merged, and the caller
        quarantines it, since merged it would reach every row of the batch."""
        if self._slots.kind(name) != "lora":
            raise AdapterError(f"cannot merge {name!r}: not a registered LoRA adapter")
        self._slots.check_servable(name)
        self.unmerge()
        pinned_here = name not in self._slots.pinned
        slot = self._slots.pin(name)
        entries = {proj: table.entries[slot] for proj, table in self._slots.tables.items() if slot in table.entries}
        try:
            copies = self._merged_copies(name, entries)
        except AdapterValueError:
            if pinned_here:
                self._slots.unpin(name)
            raise
        for layer, copy in zip(self._layers, copies):
            layer.merged = copy
        self.merged, self._slot, self._pinned_here = name, slot, pinned_here
        self._rank = max(rank for rank, _ in entries.values())
        self.switches += 1
        if static:
            self.policy.static = name

    def _merged_copies(self, name: str, entries: dict[str, tuple[int, int]]) -> list[DenseLinear | None]:
        """Each layer's merged copy; raises AdapterValueError when the device copy of `name` or a
        merged weight is not servable."""
        problem = self._slots.problem(name)
        if problem is not None:
            raise AdapterValueError(problem)
        return [build_merged(layer, entries, self._ops, self._dtype) for layer in self._layers]

    def unmerge(self) -> None:
        """Back to the base weights for every layer (the merged copies are dropped)."""
        if self.merged is None:
            return
        for layer in self._layers:
            layer.merged = None
        if self._pinned_here:
            self._slots.unpin(self.merged)
        self.merged, self._slot = None, None
        self.switches += 1

    def forget(self, name: str) -> None:
        """`name` is leaving (unregistered or quarantined): unmerged if it is merged, and no longer
        kept merged by the policy."""
        if name == self.merged:
            self.unmerge()
        if self.policy.static == name:
            self.policy.static = None

    def wanted(self, running: list[str | None]) -> str | None:
        """The adapter the policy wants merged after observing the running sequences' adapters
        (None: none); quarantined adapters are left out of the observation."""
        servable = [name for name in running if name not in self._slots.quarantined]
        return self.policy.decide(self.merged, servable)

    # planning ----------------------------------------------------------------------------
    def plan(self, seq_slots: list[int], rows: list[int]) -> MergePlan:
        """How a batch is served: sequence i holds adapter slot seq_slots[i] and rows[i] rows."""
        merged = [slot == self._slot for slot in seq_slots]
        lora_slots = [-1 if m else slot for slot, m in zip(seq_slots, merged)]
        return MergePlan(lora_slots, self._step(rows, merged))

    def _step(self, rows: list[int], merged: list[bool]) -> MergeStep | None:
        num_merged = sum(n for n, m in zip(rows, merged) if m)
        mode = merge_mode(num_merged, sum(rows) - num_merged, self._rank, self._quantized)
        self.last_mode = mode
        if mode is None or mode == "merged":
            return None if mode is None else MergeStep("merged")
        if mode == "correct":
            others = [-1 if m else self._slot for m in merged]
            correction = LoraBatch.build(others, rows, self._slots.tables, self._device, ops=self._ops)
            return MergeStep("correct", correction=correction)
        return MergeStep("split", merged_rows=self._rows_where(rows, merged, True),
                         other_rows=self._rows_where(rows, merged, False))

    def _rows_where(self, rows: list[int], merged: list[bool], want: bool) -> torch.Tensor:
        """Batch rows of the sequences whose merged flag is `want` (sequence i has rows[i] rows)."""
        picked, start = [], 0
        for n, m in zip(rows, merged):
            if m == want:
                picked.append(torch.arange(start, start + n))
            start += n
        return torch.cat(picked).to(self._device)
