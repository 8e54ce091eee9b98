"""Continuous batching: which sequences run in the next step.

A step is a prefill of newly admitted sequences when any can be admitted, else one decode
token for every running sequence. Admission is FIFO and needs: room under `max_running`,
room under `max_batch_tokens` (a lone long prompt is still admitted), enough free KV blocks
for all its positions, and a device slot for its adapter. When a decode step runs out of
blocks, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue, to be recomputed from its prompt and the tokens it already produced.
"""
from __future__ import annotations

from collections import deque

from .adapter_slots import AdapterSlots
from .adapter_errors import SlotsExhausted
from .adapters import AdapterError
from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: AdapterSlots, max_running: int, max_batch_tokens: int) -> None:
        self.blocks = blocks
        self.slots = slots
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool, list[tuple[Sequence, str, str]]]:
        """-> (sequences to run, whether it is a prefill, failed sequences as (seq, message, code))
        where code is a status name: RESOURCE_EXHAUSTED or INTERNAL."""
        failed: list[tuple[Sequence, str, str]] = []
        admitted = self._admit(failed)
        if admitted:
            return admitted, True, failed
        return self._decode_batch(), False, failed

    def _admit(self, failed: list[tuple[Sequence, str, str]]) -> list[Sequence]:
        """FIFO by memory; a sequence whose adapter waits for a free slot is passed over (it keeps
        its place) so requests for resident adapters and the base model are not held up."""
        batch: list[Sequence] = []
        tokens = 0
        passed_over: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if batch and tokens + seq.num_tokens > self.max_batch_tokens:
                break
            if not self.blocks.can_allocate(seq.num_tokens):
                break
            self.waiting.popleft()
            if seq.adapter is not None:
                if not self.slots.ready(seq.adapter):  # its files are being read in the background
                    passed_over.append(seq)
                    continue
                try:
                    slot = self.slots.acquire(seq.adapter)
                except (AdapterError, OSError) as exc:
                    seq.status = Status.FINISHED
                    code = "RESOURCE_EXHAUSTED" if isinstance(exc, SlotsExhausted) else "INTERNAL"
                    failed.append((seq, f"adapter {seq.adapter!r} could not be loaded: {exc}", code))
                    continue
                if slot is None:
                    passed_over.append(seq)
                    continue
                seq.slot = slot
            self.blocks.allocate(seq.block_table, seq.num_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(seq)
            tokens += seq.num_tokens
        self.waiting.extendleft(reversed(passed_over))
        return batch

    def _decode_batch(self) -> list[Sequence]:
        queue = sorted(self.running, key=lambda s: s.order)
        batch: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            while self.blocks.needs_block(seq.block_table, seq.num_tokens) and self.blocks.num_free == 0:
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq.block_table, seq.num_tokens)
                batch.append(seq)
        self.running = batch
        return list(batch)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1

    def finish(self, seq: Sequence) -> None:
        """Free a running or waiting sequence's blocks and slot and forget it."""
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
