"""Continuous batching with chunked prefill: what each sequence computes in the next step.

A step gives every scheduled sequence a chunk of positions (`Chunk`), from its first position
without KV entries (`num_computed`). Per step:

1. Decode first: every running sequence with only its last position left gets that one
   position. When a decoding sequence needs a new KV block and none is free, the newest running
   sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
   recomputed from its prompt and the tokens it already produced (`num_computed` back to 0).
2. Then prefill work fills a token budget: `prefill_chunk_tokens` (at most `max_batch_tokens`)
   when at least one sequence decodes in this step, so running streams are never stalled by a
   long prefill; `max_batch_tokens` when none does, so a burst of fresh requests still prefills
   in one big step. Sequences already part-way through their prefill come first, then admissions.
   A prompt longer than what is left of the budget takes what is left and continues next step;
   only the chunk that reaches a sequence's end samples a token.

With `prefill_chunk_tokens` None (auto, the CPU default) the budget while decoding is the
number of decoding sequences plus `AUTO_PREFILL_EXTRA_TOKENS`. On a CPU a step's cost is a
floor (reading the weights, worth about that many tokens of compute) plus a cost per token, so
that budget keeps a step within about twice the decode-only step: the streams' gap between
tokens stays bounded while newcomers prefill, at the price of their time to first token.

The n completions of one request share the KV blocks of their prompt: the first (the leader)
computes it, the others wait for it, then take its full blocks before the last prompt position
and compute only the rest (at most a block's worth), so an n-way request prefills about once.
Any other sequence starts from the longest prefix of its prompt whose blocks are in the prefix
cache (block_manager.py), again short of its last prompt position, whose logits it needs; while
a running sequence is computing the next block of that prefix, it waits for it instead.

Admission is FIFO and needs room under `max_running`, enough free KV blocks for all the
sequence's positions (allocated at admission, whatever its first chunk), and a device slot for
its adapter. A sequence whose adapter is being read, or waits for a free slot, is passed over
without losing its place. Copying an adapter into a slot takes time on the engine thread, so
while sequences decode at most one sequence per step is admitted whose adapter is not already
resident (the others are passed over until a later step), and that sequence's prefill begins
in the step after its copy.
"""
from __future__ import annotations

from collections import deque

from .adapter_slots import AdapterSlots
from .adapter_errors import AdapterError, AdapterQuarantined, SlotsExhausted
from .block_manager import BlockManager
from .sequence import Chunk, Sequence, Status

AUTO_PREFILL_EXTRA_TOKENS = 16
# (sequence, message, status name: RESOURCE_EXHAUSTED, FAILED_PRECONDITION or INTERNAL)
Failure = tuple[Sequence, str, str]


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: AdapterSlots, max_running: int, max_batch_tokens: int,
                 prefill_chunk_tokens: int | None = 256) -> None:
        self.blocks = blocks
        self.slots = slots
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.reused_tokens = 0  # prompt positions admitted with their KV already computed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Chunk], list[Failure]]:
        """-> (the step's chunks: decodes, then continued prefills, then admissions; sequences that
        failed, as (seq, message, code) where code is a status name)."""
        failed: list[Failure] = []
        running = self._make_room()
        decodes = [Chunk(s, s.num_computed, 1) for s in running if not s.is_prefilling]
        budget = min(self._chunk_budget(len(decodes)), self.max_batch_tokens) if decodes else self.max_batch_tokens
        chunks = list(decodes)
        for seq in running:
            if seq.is_prefilling and budget > 0:
                chunks.append(self._chunk(seq, budget))
                budget -= chunks[-1].length
        chunks += self._admit(budget, bool(decodes), failed)
        return chunks, failed

    def _chunk_budget(self, num_decoding: int) -> int:
        if self.prefill_chunk_tokens is None:
            return num_decoding + AUTO_PREFILL_EXTRA_TOKENS
        return self.prefill_chunk_tokens

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> Chunk:
        """The next chunk of `seq`: its positions without KV entries, at most `budget` of them."""
        return Chunk(seq, seq.num_computed, min(seq.num_tokens - seq.num_computed, budget))

    def _admit(self, budget: int, decoding: bool, failed: list[Failure]) -> list[Chunk]:
        """First chunks of newly admitted sequences, within `budget` tokens. FIFO by memory; a
        sequence whose adapter waits (being read, no free slot, or, while `decoding`, a second
        adapter to copy into a slot this step) is passed over, keeping its place, so requests for
        resident adapters and the base model are not held up. While `decoding`, a sequence whose
        adapter was just copied into its slot gets its first chunk in the next step, so the copy
        and the adapter's first rows do not land on the running streams in one step."""
        chunks: list[Chunk] = []
        passed_over: list[Sequence] = []
        loaded = False  # an adapter was copied into a slot in this step
        in_progress = {h for s in self.running for h in self._pending_hashes(s)}
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            shared = self._shareable_blocks(seq)
            if shared is None:  # its first completion is still computing the prompt they share
                passed_over.append(self.waiting.popleft())
                continue
            cached, idle = (0, 0) if shared else self.blocks.cached_count(seq.prefix_hashes)
            if not shared and seq.prefix_hashes[cached:cached + 1] and seq.prefix_hashes[cached] in in_progress:
                # a running sequence is computing the next block of this prompt's prefix: wait a
                # step or two and find it cached, rather than compute it beside it (a burst of
                # requests on one endpoint)
                passed_over.append(self.waiting.popleft())
                continue
            if self.blocks.blocks_for(seq.num_tokens) - (shared or cached) > self.blocks.num_free - idle:
                break
            self.waiting.popleft()
            resident = True  # no adapter: nothing to copy
            if seq.adapter is not None:
                resident = self.slots.is_resident(seq.adapter)
                if not self.slots.ready(seq.adapter) or (decoding and loaded and not resident):
                    passed_over.append(seq)
                    continue
                if not self._take_slot(seq, failed):
                    if seq.status is not Status.FINISHED:
                        passed_over.append(seq)
                    continue
                loaded = loaded or not resident
            if shared:
                seq.block_table = self.blocks.share(seq.leader.block_table[:shared])
            elif cached:
                seq.block_table = self.blocks.cached_prefix(seq.prefix_hashes[:cached])
            seq.num_computed = len(seq.block_table) * self.blocks.block_size
            self.reused_tokens += seq.num_computed
            self.blocks.allocate(seq.block_table, seq.num_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            in_progress.update(self._pending_hashes(seq))
            if decoding and not resident:
                continue  # the copy is this step's extra work; its prefill starts next step
            chunks.append(self._chunk(seq, budget))
            budget -= chunks[-1].length
        self.waiting.extendleft(reversed(passed_over))
        return chunks

    def computed(self, chunks: list[Chunk]) -> None:
        """After a step ran `chunks`: advance each sequence, and enter every prompt block it
        completed into the prefix cache."""
        bs = self.blocks.block_size
        for c in chunks:
            c.seq.num_computed = c.end
            for i in range(c.start // bs, min(c.end // bs, len(c.seq.prefix_hashes))):
                self.blocks.register(c.seq.block_table[i], c.seq.prefix_hashes[i])

    def _pending_hashes(self, seq: Sequence) -> list[bytes]:
        """Prefix hashes of the prompt blocks `seq` has still to compute (a hash names its whole
        prefix, so equal hashes mean equal blocks at the same place)."""
        return seq.prefix_hashes[seq.num_computed // self.blocks.block_size:]

    def _shareable_blocks(self, seq: Sequence) -> int | None:
        """How many KV blocks `seq` can take from its request's first completion (`leader`): the
        full blocks before its last prompt position, once the leader has computed them. Each
        completion computes that last position itself, for its own first token's logits. None: the
        leader has not computed them yet (wait); 0: nothing to share (a short prompt, or the leader
        has finished and freed its blocks)."""
        leader = seq.leader
        if leader is None:
            return 0
        blocks = (seq.num_prompt_positions - 1) // self.blocks.block_size
        if blocks == 0 or leader.status is Status.FINISHED:
            return 0
        if leader.status is Status.WAITING or leader.num_computed < blocks * self.blocks.block_size:
            return None
        return blocks

    def _take_slot(self, seq: Sequence, failed: list[Failure]) -> bool:
        """Reference `seq`'s adapter slot (copying the adapter in if needed). False when every slot
        is held (it waits), or when the adapter cannot be loaded (it fails, recorded in `failed`)."""
        try:
            slot = self.slots.acquire(seq.adapter)
        except AdapterQuarantined as exc:  # found bad (now or before): refused, not a load failure
            seq.status = Status.FINISHED
            failed.append((seq, str(exc), exc.status))
            return False
        except (AdapterError, OSError) as exc:
            seq.status = Status.FINISHED
            code = "RESOURCE_EXHAUSTED" if isinstance(exc, SlotsExhausted) else "INTERNAL"
            failed.append((seq, f"adapter {seq.adapter!r} could not be loaded: {exc}", code))
            return False
        if slot is None:
            return False
        seq.slot = slot
        return True

    def _make_room(self) -> list[Sequence]:
        """The running sequences in admission order, after giving each decoding one the KV block its
        next token needs (prefilling ones hold all theirs), preempting the newest when none is free."""
        queue = sorted(self.running, key=lambda s: s.order)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            while self.blocks.needs_block(seq.block_table, seq.num_tokens) and self.blocks.num_free == 0:
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq.block_table, seq.num_tokens)
                kept.append(seq)
        self.running = kept
        return list(kept)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
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
