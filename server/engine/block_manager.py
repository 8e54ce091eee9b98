"""KV-cache block allocation: a free list of fixed-size blocks, each sequence's block table, and
the prefix cache.

A block may be held by several tables: the n completions of one request share the blocks of
their common prompt (`share`), and requests whose prompts begin alike share the blocks of that
beginning (`cached_prefix`). Each block counts its holders. Shared blocks are only ever read:
they hold positions below every holder's `num_computed`, and a sequence writes only positions at
or past its own.

Prefix cache: once a full block of a prompt is computed, it is registered under the hash of its
whole prefix (`prefix_hashes`: every token id up to the block's end, plus what else shapes its
keys and values: the adapter and soft prompt, by registration). A block whose last holder frees
it keeps its contents and stays findable until its memory is needed: fresh blocks come from
never-registered ones first, then from cached ones, least recently freed first.

Isolation: a block handed out again still holds its last owner's keys and values, and decode
attention reads whole blocks, the positions past a sequence's end included (masked, but 0 x NaN
is NaN whether the mask is added or applied). So every block taken is listed in `fresh`, and the
model runner zeroes those before the next forward; block tables are padded with `pad_block`, one
block past the last, which the cache holds but nothing writes. Positions a query must not see
then hold zeros, whatever another tenant wrote there. A sequence whose values went non-finite
has its blocks `forget`-ten first, so they never enter the prefix cache.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def prefix_hashes(ids: list[int], block_size: int, num_blocks: int, key: str) -> list[bytes]:
    """Hashes of the first `num_blocks` full blocks of `ids`; hash i covers ids[: (i + 1) * block_size]
    and `key`. blake2b, not Python's hash: a prompt crafted to collide with another tenant's
    prefix must not read that tenant's keys and values."""
    hashes, parent = [], hashlib.blake2b(key.encode(), digest_size=16).digest()
    data = array("q", ids[:num_blocks * block_size]).tobytes()
    step = block_size * 8
    for i in range(num_blocks):
        parent = hashlib.blake2b(parent + data[i * step:(i + 1) * step], digest_size=16).digest()
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # held by none, nothing cached
        self._holders = [0] * num_blocks  # tables holding each block
        self._hash_of: dict[int, bytes] = {}  # registered block -> its prefix hash
        self._block_of: dict[bytes, int] = {}  # prefix hash -> registered block
        self._idle: OrderedDict[int, None] = OrderedDict()  # held by none, still cached; oldest first
        self.pad_block = num_blocks  # padding in block tables: a block the cache holds and nothing writes
        self.fresh: list[int] = []  # blocks taken since the runner last zeroed them

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def allocate(self, table: list[int], num_tokens: int) -> None:
        """Grow `table` so it holds `num_tokens` tokens; raises MemoryError when blocks run out."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            raise MemoryError(f"need {need} KV blocks, {self.num_free} free")
        for _ in range(need):
            table.append(self._take())

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # reuse the cached block freed longest ago; its contents are forgotten
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._holders[block] = 1
        self.fresh.append(block)
        return block

    def take_fresh(self) -> list[int]:
        """The blocks taken since the last call (their contents are a former owner's: zero them)."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def share(self, blocks: list[int]) -> list[int]:
        """A new table starting with `blocks` (full blocks of another table), now held by both."""
        for block in blocks:
            self._hold(block)
        return list(blocks)

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """A new table holding the cached blocks of the longest prefix of `hashes` found."""
        table = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            self._hold(block)
            table.append(block)
        return table

    def cached_count(self, hashes: list[bytes]) -> tuple[int, int]:
        """(blocks in the longest cached prefix of `hashes`, how many of those no table holds: they
        count as free until `cached_prefix` takes them)."""
        found = idle = 0
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            found += 1
            idle += self._holders[block] == 0
        return found, idle

    def _hold(self, block: int) -> None:
        if self._holders[block] == 0:
            del self._idle[block]
        self._holders[block] += 1

    def register(self, block: int, prefix_hash: bytes) -> None:
        """`block` now holds the computed keys and values of the prefix `prefix_hash` names."""
        if prefix_hash not in self._block_of and block not in self._hash_of:
            self._block_of[prefix_hash] = block
            self._hash_of[block] = prefix_hash

    def forget(self, table: list[int]) -> None:
        """Take `table`'s blocks out of the prefix cache (its values went non-finite): freed, they
        go back to the free list instead of waiting to be found."""
        for block in table:
            prefix_hash = self._hash_of.pop(block, None)
            if prefix_hash is not None:
                del self._block_of[prefix_hash]

    def needs_block(self, table: list[int], num_tokens: int) -> bool:
        """Whether holding `num_tokens` tokens takes one more block than `table` has."""
        return self.blocks_for(num_tokens) > len(table)

    def free(self, table: list[int]) -> None:
        for block in reversed(table):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if block in self._hash_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        table.clear()

    def kv_position(self, table: list[int], position: int) -> int:
        """The KV position of the token at `position`: its flat cache row (block * block_size + offset)."""
        return table[position // self.block_size] * self.block_size + position % self.block_size
