"""Attention over the paged KV cache (PyTorch path).

The cache of one layer is two tensors `[num_blocks, block_size, kv_heads, head_dim]`. Each
sequence owns a list of blocks (its block table); token at position p lives in block
`table[p // block_size]`, offset `p % block_size`. A step's new keys and values are written to
the cache (`write_kv`) before attention runs.

A step gives each sequence a chunk of positions (see `Chunk` in sequence.py). Three layouts:
- prefill: every chunk starts at position 0 (fresh prompts, or prompts recomputed after a
  preemption), nothing else: padded batched SDPA over the step's own keys;
- decode: one query per sequence; its keys are read back from the cache through the block table;
- mixed: decode rows as above, and chunk rows (queries continuing a cached prefix) whose keys,
  prefix and chunk, are gathered from the cache into a padded layout with a causal mask. The two
  groups run as separate SDPA calls: decode rows are never padded to the chunk length.

Isolation: the cache layouts read whole blocks, so keys past a query's position are read too
(masked). Those positions hold zeros, never another tenant's values: blocks are zeroed when taken
and tables are padded with a block nothing writes (`BlockManager.pad_block`). A masked position
must hold a finite value because masking cannot hide a non-finite one: SDPA adds the mask (-inf
plus NaN is NaN) and multiplies the value by its zero weight (0 x inf is NaN). Zeroing at
allocation costs a write of each block once per owner, instead of a `torch.where` over every
gathered key and value in every layer of every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillLayout:
    """Chunks that all start at position 0: each sequence padded to max_len rows."""

    num_seqs: int
    max_len: int
    token_index: torch.Tensor  # [T] row of each token in the padded [B * max_len] layout
    prefill_mask: torch.Tensor  # [B, 1, max_len, max_len] bool, causal and within length


@dataclass
class PagedLayout:
    """Queries whose keys (their own included) are read from the cache: sequence b's queries are
    positions [start_b, start_b + len_b), padded to max_len rows."""

    block_tables: torch.Tensor  # [B, max_blocks] long (padding points at the pad block, all zeros)
    mask: torch.Tensor  # [B, 1, max_len, max_blocks * block_size] bool: key j visible to query i iff j <= start_b + i
    max_len: int = 1
    token_index: torch.Tensor | None = None  # [Q] row of each query in the padded [B * max_len] layout; None if max_len 1

    @staticmethod
    def build(block_tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
              device: torch.device, pad_block: int) -> "PagedLayout":
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [pad_block] * (width - len(t)) for t in block_tables], dtype=torch.long,
                              device=device)
        max_len = max(lens)
        keys = torch.arange(width * block_size, device=device)
        if max_len == 1:
            mask = keys[None, :] <= torch.tensor(starts, device=device)[:, None]  # [B, W]
            return PagedLayout(tables, mask[:, None, None, :])
        query_pos = torch.tensor(starts, device=device)[:, None] + torch.arange(max_len, device=device)  # [B, L]
        mask = keys[None, None, :] <= query_pos[:, :, None]  # [B, L, W]
        token_index = torch.cat([torch.arange(n) + b * max_len for b, n in enumerate(lens)]).to(device)
        return PagedLayout(tables, mask[:, None], max_len, token_index)


@dataclass
class AttentionMetadata:
    kv_positions: torch.Tensor  # [T] long: KV position (flat cache row: block * block_size + offset) of each new token
    prefill: PrefillLayout | None = None  # set: the whole step is a prefill from position 0
    decode: PagedLayout | None = None  # one query per sequence
    chunks: PagedLayout | None = None  # queries continuing a cached prefix (mixed steps)
    decode_rows: torch.Tensor | None = None  # [D] batch rows of the decode queries; None: every row
    chunk_rows: torch.Tensor | None = None  # [C] batch rows of the chunk queries

    @staticmethod
    def for_prefill(seq_lens: list[int], kv_positions: torch.Tensor, device: torch.device) -> "AttentionMetadata":
        max_len = max(seq_lens)
        lens = torch.tensor(seq_lens, device=device)
        starts = torch.arange(len(seq_lens), device=device) * max_len
        token_index = torch.cat([torch.arange(n, device=device) + s for n, s in zip(seq_lens, starts.tolist())])
        pos = torch.arange(max_len, device=device)
        causal = pos[None, :] <= pos[:, None]  # [L, L] query i sees keys j <= i
        mask = causal[None, None] & (pos[None, None, None, :] < lens[:, None, None, None])
        return AttentionMetadata(kv_positions, prefill=PrefillLayout(len(seq_lens), max_len, token_index, mask))

    @staticmethod
    def for_decode(
        block_tables: list[list[int]], context_lens: list[int], block_size: int,
        kv_positions: torch.Tensor, device: torch.device, pad_block: int,
    ) -> "AttentionMetadata":
        starts = [n - 1 for n in context_lens]
        return AttentionMetadata(kv_positions, decode=PagedLayout.build(block_tables, starts, [1] * len(starts),
                                                                        block_size, device, pad_block))

    @staticmethod
    def for_mixed(
        decode_rows: list[int], chunk_rows: list[int], decode: PagedLayout | None, chunks: PagedLayout | None,
        kv_positions: torch.Tensor, device: torch.device,
    ) -> "AttentionMetadata":
        """decode_rows / chunk_rows: batch rows of the queries each layout serves, in its order."""
        def rows(r: list[int]) -> torch.Tensor | None:
            return torch.tensor(r, dtype=torch.long, device=device) if r else None

        return AttentionMetadata(kv_positions, decode=decode, chunks=chunks, decode_rows=rows(decode_rows),
                                 chunk_rows=rows(chunk_rows))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kv_positions: torch.Tensor) -> None:
    """Store new keys/values k, v [T, kv_heads, head_dim] at their KV positions [T] (flat cache rows)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, kv_positions, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, kv_positions, v)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
) -> torch.Tensor:
    """q [T, heads, hd], k/v [T, kv_heads, hd] (already written to the cache) -> [T, heads * hd]."""
    if meta.prefill is not None:
        return _prefill(q, k, v, meta.prefill)
    if meta.decode_rows is None and meta.chunks is None:
        return _paged(q, k_cache, v_cache, meta.decode)
    num_tokens, heads, hd = q.shape
    out = q.new_empty(num_tokens, heads * hd)
    for rows, layout in ((meta.decode_rows, meta.decode), (meta.chunk_rows, meta.chunks)):
        if layout is not None:
            out.index_copy_(0, rows, _paged(q.index_select(0, rows), k_cache, v_cache, layout))
    return out


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PrefillLayout) -> torch.Tensor:
    num_tokens, heads, hd = q.shape
    if meta.num_seqs == 1:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, enable_gqa=True
        )  # [1, heads, T, hd]
        return out[0].transpose(0, 1).reshape(num_tokens, heads * hd)
    rows = meta.num_seqs * meta.max_len

    def pad(t: torch.Tensor) -> torch.Tensor:  # [T, h, hd] -> [B, h, max_len, hd]
        padded = t.new_zeros(rows, *t.shape[1:]).index_copy_(0, meta.token_index, t)
        return padded.view(meta.num_seqs, meta.max_len, *t.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=meta.prefill_mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(rows, heads * hd).index_select(0, meta.token_index)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks of each table [B, max_blocks] -> keys or values [B, kv_heads, max_blocks * block_size, hd]."""
    num_seqs = tables.shape[0]
    blocks = cache.index_select(0, tables.reshape(-1))  # [B * max_blocks, block_size, kvh, hd]
    return blocks.view(num_seqs, -1, *cache.shape[2:]).transpose(1, 2)


def _paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedLayout) -> torch.Tensor:
    """q [Q, heads, hd] -> [Q, heads * hd]; keys and values gathered from the cache."""
    num_queries, heads, hd = q.shape
    keys, values = _gather(k_cache, meta.block_tables), _gather(v_cache, meta.block_tables)
    if meta.token_index is None:  # one query per sequence (decode)
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=meta.mask, enable_gqa=True)
        return out.reshape(num_queries, heads * hd)  # from [B, heads, 1, hd]
    rows = meta.block_tables.shape[0] * meta.max_len
    padded = q.new_zeros(rows, heads, hd).index_copy_(0, meta.token_index, q)
    padded = padded.view(-1, meta.max_len, heads, hd).transpose(1, 2)  # [B, heads, max_len, hd]
    out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=meta.mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(rows, heads * hd).index_select(0, meta.token_index)
