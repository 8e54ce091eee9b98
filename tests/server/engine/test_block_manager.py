"""KV block allocation: tables grow from a free list; shared blocks return to it with their last holder."""
from __future__ import annotations

import pytest

from loraplex.server.engine.block_manager import BlockManager


def test_allocate_grows_a_table_to_its_token_count_and_free_returns_every_block():
    blocks = BlockManager(num_blocks=6, block_size=4)
    table: list[int] = []
    blocks.allocate(table, 9)
    assert len(table) == 3 and len(set(table)) == 3 and blocks.num_free == 3
    blocks.allocate(table, 12)
    assert len(table) == 3
    with pytest.raises(MemoryError):
        blocks.allocate(table, 30)
    blocks.free(table)
    assert table == [] and blocks.num_free == 6


def test_a_shared_block_is_freed_by_its_last_holder_only():
    blocks = BlockManager(num_blocks=8, block_size=4)
    leader: list[int] = []
    blocks.allocate(leader, 14)  # 4 blocks
    sibling = blocks.share(leader[:3])
    blocks.allocate(sibling, 14)  # its own 4th block
    assert sibling[:3] == leader[:3] and sibling[3] != leader[3]
    assert blocks.num_free == 3
    blocks.free(leader)
    assert blocks.num_free == 4  # only the leader's own last block came back
    other: list[int] = []
    blocks.allocate(other, 16)
    assert not set(other) & set(sibling), "a block still held by the sibling was handed out again"
    blocks.free(sibling)
    blocks.free(other)
    assert blocks.num_free == 8
