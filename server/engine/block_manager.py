"""KV-cache block allocation: a free list of fixed-size blocks and each sequence's block table.

A block may be held by several tables: the n completions of one request share the blocks of
their common prompt (`share`). Each block counts its holders and returns to the free list when
the last one frees it. Shared blocks are only ever read: they hold positions below every
holder's `num_computed`, and a sequence writes only positions at or past its own.
"""
from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._holders = [0] * num_blocks  # tables holding each block

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, table: list[int], num_tokens: int) -> None:
        """Grow `table` so it holds `num_tokens` tokens; raises MemoryError when blocks run out."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise MemoryError(f"need {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            block = self._free.pop()
            self._holders[block] = 1
            table.append(block)

    def share(self, blocks: list[int]) -> list[int]:
        """A new table starting with `blocks` (full blocks of another table), now held by both."""
        for block in blocks:
            self._holders[block] += 1
        return list(blocks)

    def needs_block(self, table: list[int], num_tokens: int) -> bool:
        """Whether holding `num_tokens` tokens takes one more block than `table` has."""
        return self.blocks_for(num_tokens) > len(table)

    def free(self, table: list[int]) -> None:
        for block in reversed(table):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                self._free.append(block)
        table.clear()

    def slot(self, table: list[int], position: int) -> int:
        """Flat cache row of the token at `position`."""
        return table[position // self.block_size] * self.block_size + position % self.block_size
