"""Turns a step's chunks (see `Chunk`) into model inputs, runs the model, returns logits.

Chunks are ordered by adapter slot inside the step so each adapter's rows are one contiguous
segment. A step of decodes only takes the cheap path (`_decode_batch`, its LoRA grouping reused
while the batch keeps its make-up); any other step is built by `_chunk_batch`. Logits come only
for chunks that reach their sequence's end (those sample a token).

Before each forward the runner zeroes the KV blocks taken since the last one (see
block_manager.py: masked positions must hold zeros, not a former owner's values). After it,
`non_finite` lists the sequences with a row whose hidden state or logits went non-finite: the
engine fails those alone, before their blocks can enter the prefix cache.
"""
from __future__ import annotations

import torch

from loraplex.kernels import LoraOps

from .adapter_slots import AdapterSlots
from .attention import AttentionMetadata, PagedLayout
from .block_manager import BlockManager
from .lora_batch import LoraBatch
from .merger import Merger
from .model import CausalLM, ForwardBatch
from .scoring import ScoredSpan, scored_positions, split_rows
from .sequence import Chunk, Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, blocks: BlockManager, slots: AdapterSlots, ops: LoraOps,
                 device: torch.device, dtype: torch.dtype, merger: Merger) -> None:
        self.model = model
        self._decode_lora: tuple[tuple, LoraBatch | None] | None = None  # (layout key, batch) of the last decode
        self.blocks = blocks
        self.slots = slots
        self.ops = ops
        self.device = device
        self.merger = merger  # what is merged: it plans how each batch uses the merged copies
        self.non_finite: list[Sequence] = []  # sequences with a non-finite row in the last `run`
        self.scored: list[ScoredSpan] = []  # the scoring chunks' logits of the last `run`
        spec = model.spec
        # every layer's keys and values in one tensor, so fresh blocks are zeroed in one op; one
        # block more than the manager hands out: the pad block, zeros for good
        self._kv = torch.zeros(spec.num_layers, 2, blocks.num_blocks + 1, blocks.block_size, spec.num_kv_heads,
                               spec.head_dim, dtype=dtype, device=device)
        self.kv_cache = [(layer[0], layer[1]) for layer in self._kv]  # per layer (keys, values), views

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[Sequence]]:
        """-> (logits [S, vocab] float32 at the last position of each chunk that samples, those S
        sequences in the order of the rows: sorted by adapter slot). A scoring chunk's logits go
        to `self.scored` instead (scoring.py)."""
        ordered = sorted(chunks, key=lambda c: c.seq.slot)
        if all(c.is_decode for c in ordered) and not all(c.start == 0 for c in ordered):
            batch = self._decode_batch([c.seq for c in ordered])
        else:
            batch = self._chunk_batch(ordered)
        self._zero_fresh_blocks()
        logits, finite = self.model(batch, self.kv_cache)
        self.non_finite = [] if bool(finite.all()) else self._failing(ordered, finite)
        logits, self.scored = split_rows(ordered, logits)
        return logits, [c.seq for c in ordered if c.samples]

    @torch.inference_mode()
    def run_all_positions(self, seqs: list[Sequence]) -> torch.Tensor:
        """A prefill returning logits [sum of positions, vocab] for every position, in `seqs` order."""
        ordered = sorted(seqs, key=lambda s: s.slot)
        batch = self._chunk_batch([Chunk(s, 0, s.num_tokens) for s in ordered], all_logits=True)
        self._zero_fresh_blocks()
        logits, _ = self.model(batch, self.kv_cache)
        per_seq = dict(zip((id(s) for s in ordered), logits.split([s.num_tokens for s in ordered])))
        return torch.cat([per_seq[id(s)] for s in seqs])

    def _zero_fresh_blocks(self) -> None:
        """Zero, in every layer, the KV blocks taken since the last forward, in one op (a decode step
        takes a block per sequence every block_size steps: 32 sequences, 30 layers, 2 blocks a step
        took 0.15 ms here, where one zeroing op per layer and tensor took 0.3)."""
        fresh = self.blocks.take_fresh()
        if fresh:
            self._kv.index_fill_(2, torch.tensor(fresh, dtype=torch.long, device=self.device), 0)

    @staticmethod
    def _failing(chunks: list[Chunk], finite: torch.Tensor) -> list[Sequence]:
        """The sequences of `chunks` (rows in that order) with a row that is not `finite`."""
        flags, row, failing = finite.tolist(), 0, []
        for c in chunks:
            if not all(flags[row:row + c.length]):
                failing.append(c.seq)
            row += c.length
        return failing

    def _chunk_batch(self, chunks: list[Chunk], all_logits: bool = False) -> ForwardBatch:
        """Inputs of any chunks, rows in `chunks` order. Attention is one padded prefill when every
        chunk starts at position 0, else mixed (attention.py). Logits: every row with
        `all_logits`, else the last row of each chunk that samples."""
        ids, positions, kv_positions, logit_rows, soft_rows, soft_vectors = [], [], [], [], [], []
        row = 0
        for c in chunks:
            seq = c.seq
            ids += seq.chunk_ids(c.start, c.end)
            positions += range(c.start, c.end)
            kv_positions += [self.blocks.kv_position(seq.block_table, p) for p in range(c.start, c.end)]
            virtual = seq.num_virtual_in(c.start, c.end)
            if virtual:
                soft_rows += range(row, row + virtual)
                soft_vectors.append(seq.soft_prompt[c.start:c.start + virtual])
            if all_logits:
                logit_rows += range(row, row + c.length)
            elif scored_positions(c):
                logit_rows += (row + p - c.start for p in scored_positions(c))
            elif c.samples:
                logit_rows.append(row + c.length - 1)
            row += c.length
        dev = self.device
        lengths = [c.length for c in chunks]
        plan = self.merger.plan([c.seq.slot for c in chunks], lengths)
        kv = torch.tensor(kv_positions, dtype=torch.long, device=dev)
        if all(c.start == 0 for c in chunks):
            attn = AttentionMetadata.for_prefill(lengths, kv, dev)
        else:
            attn = self._mixed_attention(chunks, kv)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attn=attn,
            lora=LoraBatch.build(plan.lora_slots, lengths, self.slots.tables, dev, ops=self.ops),
            merge=plan.step,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            soft_rows=torch.tensor(soft_rows, dtype=torch.long, device=dev) if soft_rows else None,
            soft_vectors=torch.cat(soft_vectors) if soft_vectors else None,
        )

    def _mixed_attention(self, chunks: list[Chunk], kv_positions: torch.Tensor) -> AttentionMetadata:
        """Chunks of one position are served as decode rows, longer ones as chunk rows."""
        decode_rows, chunk_rows, decodes, longer = [], [], [], []
        row = 0
        for c in chunks:
            if c.length == 1:
                decode_rows.append(row)
                decodes.append(c)
            else:
                chunk_rows += range(row, row + c.length)
                longer.append(c)
            row += c.length
        return AttentionMetadata.for_mixed(decode_rows, chunk_rows, self._paged_layout(decodes),
                                           self._paged_layout(longer), kv_positions, self.device)

    def _paged_layout(self, chunks: list[Chunk]) -> PagedLayout | None:
        """Layout of chunks whose keys are read from the cache: each sees its blocks up to its end."""
        if not chunks:
            return None
        tables = [c.seq.block_table[:self.blocks.blocks_for(c.end)] for c in chunks]
        return PagedLayout.build(tables, [c.start for c in chunks], [c.length for c in chunks],
                                 self.blocks.block_size, self.device, self.blocks.pad_block)

    def _decode_batch(self, seqs: list[Sequence]) -> ForwardBatch:
        dev = self.device
        bs = self.blocks.block_size
        positions = [s.num_tokens - 1 for s in seqs]
        kv_positions = torch.tensor([self.blocks.kv_position(s.block_table, p) for s, p in zip(seqs, positions)],
                                    dtype=torch.long, device=dev)
        plan = self.merger.plan([s.slot for s in seqs], [1] * len(seqs))
        return ForwardBatch(
            input_ids=torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attn=AttentionMetadata.for_decode(
                [s.block_table for s in seqs], [s.num_tokens for s in seqs], bs, kv_positions, dev,
                self.blocks.pad_block,
            ),
            lora=self._decode_lora_batch(plan.lora_slots),
            merge=plan.step,
            logit_rows=torch.arange(len(seqs), device=dev),
        )

    def _decode_lora_batch(self, seq_slots: list[int]) -> LoraBatch | None:
        """The decode batch's LoRA grouping, reused while neither the batch's slots nor the adapters
        in them change (a decode batch keeps its make-up for many steps)."""
        key = (tuple(seq_slots), self.slots.version)
        if self._decode_lora is None or self._decode_lora[0] != key:
            batch = LoraBatch.build(seq_slots, [1] * len(seq_slots), self.slots.tables, self.device, ops=self.ops)
            self._decode_lora = (key, batch)
        return self._decode_lora[1]
