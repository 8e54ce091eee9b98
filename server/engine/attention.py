"""Attention over the paged KV cache (PyTorch path).

The cache of one layer is two tensors `[num_blocks, block_size, kv_heads, head_dim]`. Each
sequence owns a list of blocks (its block table); token at position p lives in block
`table[p // block_size]`, offset `p % block_size`.

A step is either a prefill (every sequence brings all its tokens: a fresh prompt, or a
preempted sequence recomputed from scratch) or a decode (one new token per sequence).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] long: flat cache row (block * block_size + offset) of each new token
    # prefill: sequences padded to max_len rows each
    num_seqs: int = 0
    max_len: int = 0
    token_index: torch.Tensor | None = None  # [T] row of each token in the padded [B * max_len] layout
    prefill_mask: torch.Tensor | None = None  # [B, 1, max_len, max_len] bool, causal and within length
    # decode
    block_tables: torch.Tensor | None = None  # [B, max_blocks] long (padding points at block 0)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] bool: position < context length

    @staticmethod
    def for_prefill(seq_lens: list[int], slot_mapping: torch.Tensor, device: torch.device) -> "AttentionMetadata":
        max_len = max(seq_lens)
        lens = torch.tensor(seq_lens, device=device)
        starts = torch.arange(len(seq_lens), device=device) * max_len
        token_index = torch.cat([torch.arange(n, device=device) + s for n, s in zip(seq_lens, starts.tolist())])
        pos = torch.arange(max_len, device=device)
        causal = pos[None, :] <= pos[:, None]  # [L, L] query i sees keys j <= i
        mask = causal[None, None] & (pos[None, None, None, :] < lens[:, None, None, None])
        return AttentionMetadata(True, slot_mapping, len(seq_lens), max_len, token_index, mask)

    @staticmethod
    def for_decode(
        block_tables: list[list[int]], context_lens: list[int], block_size: int,
        slot_mapping: torch.Tensor, device: torch.device,
    ) -> "AttentionMetadata":
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long, device=device)
        pos = torch.arange(width * block_size, device=device)
        mask = pos[None, :] < torch.tensor(context_lens, device=device)[:, None]
        return AttentionMetadata(False, slot_mapping, block_tables=tables, decode_mask=mask[:, None, None, :])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new keys/values k, v [T, kv_heads, head_dim] at flat cache rows `slots` [T]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
) -> torch.Tensor:
    """q [T, heads, hd], k/v [T, kv_heads, hd] (already written to the cache) -> [T, heads * hd]."""
    if meta.is_prefill:
        return _prefill(q, k, v, meta)
    return _decode(q, k_cache, v_cache, meta)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
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


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    num_seqs, heads, hd = q.shape
    tables = meta.block_tables
    width = tables.shape[1] * k_cache.shape[1]

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [B, kv_heads, width, hd]
        blocks = cache.index_select(0, tables.reshape(-1))  # [B * max_blocks, block_size, kvh, hd]
        return blocks.view(num_seqs, width, *cache.shape[2:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        q[:, :, None, :], gather(k_cache), gather(v_cache), attn_mask=meta.decode_mask, enable_gqa=True
    )  # [B, heads, 1, hd]
    return out.reshape(num_seqs, heads * hd)
