"""KV-cache block allocation: a free list of fixed-size blocks and each sequence's block table."""
from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

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
            table.append(self._free.pop())

    def needs_block(self, table: list[int], num_tokens: int) -> bool:
        """Whether holding `num_tokens` tokens takes one more block than `table` has."""
        return self.blocks_for(num_tokens) > len(table)

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()

    def slot(self, table: list[int], position: int) -> int:
        """Flat cache row of the token at `position`."""
        return table[position // self.block_size] * self.block_size + position % self.block_size
