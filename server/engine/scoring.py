"""Teacher-forced scoring: the log-probability of each given token of a request's continuation,
computed in the same mixed prefill steps as generation, with no sampling.

A scoring request is a prompt whose tokens from `score_from` on are the continuation to score.
Its prefill chunks ask the model for logits at every position that predicts a continuation
token (position p predicts token p + 1), beside the one row per sampling chunk of everyone
else; nothing is sampled for it, and when its last chunk is computed it finishes with one
`TokenLogprob` per continuation token. Chunked prefill and preemption are fine: scores are kept
by position, so a recomputed chunk overwrites, never appends. The prefix cache may serve its
blocks only before the first scored position (a cached position yields no logits).

    for each step:
        rows = [last row of each sampling chunk] + [rows p of scoring chunks, first <= p < last]
        logits = model(chunks)[rows]                   # one forward for all of them
        for a scoring chunk's rows:  seq.scores[p] = log_softmax(logits[p])[token at p + 1]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import TokenLogprob, token_logprobs
from .sequence import Chunk, Sequence


@dataclass
class ScoredSpan:
    """Logits of positions [first, first + n) of `seq`, each predicting the token after it."""

    seq: Sequence
    first: int
    logits: torch.Tensor  # [n, vocab]


def first_scored(seq: Sequence) -> int:
    """The first position whose logits a scoring sequence needs (it predicts token score_from)."""
    return seq.num_virtual + seq.score_from - 1


def scored_positions(chunk: Chunk) -> range:
    """The positions of `chunk` whose logits score a continuation token (empty unless scoring)."""
    seq = chunk.seq
    if seq.score_from is None:
        return range(0)
    return range(max(chunk.start, first_scored(seq)), min(chunk.end, seq.num_tokens - 1))


def split_rows(chunks: list[Chunk], logits: torch.Tensor) -> tuple[torch.Tensor, list[ScoredSpan]]:
    """The model's logit rows (chunk by chunk: a sampling chunk's last row, or a scoring chunk's
    scored rows) -> (the sampling rows, in chunk order; the scored spans)."""
    sample_rows, spans, row = [], [], 0
    for c in chunks:
        positions = scored_positions(c)
        if positions:
            spans.append(ScoredSpan(c.seq, positions.start, logits[row:row + len(positions)]))
            row += len(positions)
        elif c.samples:
            sample_rows.append(row)
            row += 1
    if not spans:
        return logits, spans
    return logits[torch.tensor(sample_rows, dtype=torch.long, device=logits.device)], spans


def record(span: ScoredSpan) -> None:
    """Each position's log-probability of the token that follows it, kept by position."""
    seq = span.seq
    n = span.logits.shape[0]
    next_ids = seq.chunk_ids(span.first + 1, span.first + 1 + n)
    tokens = torch.tensor(next_ids, dtype=torch.long, device=span.logits.device)
    top = [seq.params.top_logprobs or 0] * n
    for offset, lp in enumerate(token_logprobs(span.logits, tokens, list(range(n)), top)):
        seq.scores[span.first + offset] = lp


def scores_of(seq: Sequence) -> list[TokenLogprob]:
    """The continuation's token log-probabilities in order (every position was recorded)."""
    return [seq.scores[p] for p in range(first_scored(seq), seq.num_tokens - 1)]
