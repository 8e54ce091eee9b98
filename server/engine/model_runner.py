"""Turns a scheduled batch of sequences into model inputs, runs the model, returns logits.

Sequences are ordered by adapter slot inside the step so each adapter's rows are one
contiguous segment; logits come back in the caller's order.
"""
from __future__ import annotations

from types import ModuleType

import torch

from .adapter_slots import AdapterSlots
from .attention import AttentionMetadata
from .block_manager import BlockManager
from .lora_batch import LoraBatch
from .merging import MergeStep, merge_mode
from .model import CausalLM, ForwardBatch
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, blocks: BlockManager, slots: AdapterSlots, ops: ModuleType,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self._decode_lora: tuple[tuple, LoraBatch | None] | None = None  # (layout key, batch) of the last decode
        self.blocks = blocks
        self.slots = slots
        self.ops = ops
        self.device = device
        self.merged_slot: int | None = None  # slot of the adapter served from merged copies
        self.merged_rank = 0
        self.quantized = False
        self.last_merge_mode: str | None = None  # how the last step used the merged copies
        spec = model.spec
        shape = (blocks.num_blocks, blocks.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_cache = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor, list[Sequence]]:
        """-> (logits [len(seqs), vocab] float32 of each sequence's last position, the sequences in
        the order of those rows: sorted by adapter slot)."""
        ordered = sorted(seqs, key=lambda s: s.slot)
        batch = self._prefill_batch(ordered, False) if is_prefill else self._decode_batch(ordered)
        return self.model(batch, self.kv_cache, self.ops), ordered

    @torch.inference_mode()
    def run_all_positions(self, seqs: list[Sequence]) -> torch.Tensor:
        """A prefill returning logits [sum of positions, vocab] for every position, in `seqs` order."""
        ordered = sorted(seqs, key=lambda s: s.slot)
        logits = self.model(self._prefill_batch(ordered, True), self.kv_cache, self.ops)
        per_seq = dict(zip((id(s) for s in ordered), logits.split([s.num_tokens for s in ordered])))
        return torch.cat([per_seq[id(s)] for s in seqs])

    def _slot_mapping(self, seq: Sequence, positions: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(seq.block_table, dtype=torch.long)
        bs = self.blocks.block_size
        return table[positions // bs] * bs + positions % bs

    def _prefill_batch(self, seqs: list[Sequence], all_logits: bool) -> ForwardBatch:
        ids, positions, slots, logit_rows, soft_rows, soft_vectors = [], [], [], [], [], []
        row = 0
        for seq in seqs:
            n = seq.num_tokens
            pos = torch.arange(n)
            ids.append(torch.tensor([0] * seq.num_virtual + seq.prefill_ids(), dtype=torch.long))
            positions.append(pos)
            slots.append(self._slot_mapping(seq, pos))
            if seq.num_virtual:
                soft_rows.append(torch.arange(row, row + seq.num_virtual))
                soft_vectors.append(seq.soft_prompt)
            logit_rows.append(torch.arange(row, row + n) if all_logits else torch.tensor([row + n - 1]))
            row += n
        dev = self.device
        slot_mapping = torch.cat(slots).to(dev)
        return ForwardBatch(
            input_ids=torch.cat(ids).to(dev),
            positions=torch.cat(positions).to(dev),
            attn=AttentionMetadata.for_prefill([s.num_tokens for s in seqs], slot_mapping, dev),
            lora=LoraBatch.build(self._lora_slots(seqs), [s.num_tokens for s in seqs], self.slots.tables, dev),
            merge=self._merge_step(seqs, [s.num_tokens for s in seqs]),
            logit_rows=torch.cat(logit_rows).to(dev),
            soft_rows=torch.cat(soft_rows).to(dev) if soft_rows else None,
            soft_vectors=torch.cat(soft_vectors) if soft_vectors else None,
        )

    def _decode_batch(self, seqs: list[Sequence]) -> ForwardBatch:
        dev = self.device
        bs = self.blocks.block_size
        positions = [s.num_tokens - 1 for s in seqs]
        slot_mapping = torch.tensor(
            [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)], dtype=torch.long, device=dev
        )
        return ForwardBatch(
            input_ids=torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attn=AttentionMetadata.for_decode(
                [s.block_table for s in seqs], [s.num_tokens for s in seqs], bs, slot_mapping, dev
            ),
            lora=self._decode_lora_batch(self._lora_slots(seqs)),
            merge=self._merge_step(seqs, [1] * len(seqs)),
            logit_rows=torch.arange(len(seqs), device=dev),
        )

    def _lora_slots(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's slot for the low-rank update: none for the merged adapter's sequences."""
        return [-1 if s.slot == self.merged_slot else s.slot for s in seqs]

    def _merge_step(self, seqs: list[Sequence], rows: list[int]) -> MergeStep | None:
        merged = [s.slot == self.merged_slot for s in seqs] if self.merged_slot is not None else [False] * len(seqs)
        num_merged = sum(n for n, m in zip(rows, merged) if m)
        mode = merge_mode(num_merged, sum(rows) - num_merged, self.merged_rank, self.quantized)
        self.last_merge_mode = mode
        if mode is None or mode == "merged":
            return None if mode is None else MergeStep("merged")
        if mode == "correct":
            others = [-1 if m else self.merged_slot for m in merged]
            return MergeStep("correct", correction=LoraBatch.build(others, rows, self.slots.tables, self.device))
        return MergeStep("split", merged_rows=self._rows_where(rows, merged, True),
                         other_rows=self._rows_where(rows, merged, False))

    def _rows_where(self, rows: list[int], merged: list[bool], want: bool) -> torch.Tensor:
        """Batch rows of the sequences whose merged flag is `want` (sequence i has rows[i] rows)."""
        picked, start = [], 0
        for n, m in zip(rows, merged):
            if m == want:
                picked.append(torch.arange(start, start + n))
            start += n
        return torch.cat(picked).to(self.device)

    def _decode_lora_batch(self, seq_slots: list[int]) -> LoraBatch | None:
        """The decode batch's LoRA grouping, reused while neither the batch's slots nor the adapters
        in them change (a decode batch keeps its make-up for many steps)."""
        key = (tuple(seq_slots), self.slots.version)
        if self._decode_lora is None or self._decode_lora[0] != key:
            batch = LoraBatch.build(seq_slots, [1] * len(seq_slots), self.slots.tables, self.device)
            self._decode_lora = (key, batch)
        return self._decode_lora[1]
