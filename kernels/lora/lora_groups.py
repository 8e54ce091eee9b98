"""How a batch's tokens are grouped for the low-rank update of one rank class.

Adapters of one projection type that share a rank live in one stacked pool (`[S, r, in]`
for A, `[S, out, r]` for B). For one step, the tokens that use adapters of that rank are
described by a `TokenGroups`: which rows of the batch they are, and which pool entry each
row (and each contiguous segment of rows) uses. Rows with no adapter appear in no group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The padded layout is used while it reads at most this many pool entries per entry in use, and
# computes at most this many padded rows per served row.
PAD_MAX_SPAN_PER_ENTRY = 2
PAD_MAX_ROWS_PER_ROW = 2


@dataclass(frozen=True)
class PaddedRows:
    """Served rows placed in a zero-padded [entries, rows_per_entry] grid over the pool entries
    entry_lo .. entry_lo + entries - 1: row i of the served rows sits at grid row index[i]
    (entry - entry_lo) * rows_per_entry + (its rank among that entry's rows).
    index is None when the grid is exactly the served rows in order (no scatter or gather)."""

    entry_lo: int
    entries: int
    rows_per_entry: int
    index: torch.Tensor | None

    @staticmethod
    def plan(seg_lens: list[int], seg_entries: list[int], device: torch.device | str) -> PaddedRows | None:
        """The grid for these segments, or None where it would waste more than the limits above."""
        used = [(n, e) for n, e in zip(seg_lens, seg_entries) if n > 0]
        if len(used) < 2:
            return None
        per_entry: dict[int, int] = {}
        for n, e in used:
            per_entry[e] = per_entry.get(e, 0) + n
        lo, hi = min(per_entry), max(per_entry)
        span, m, num_rows = hi - lo + 1, max(per_entry.values()), sum(per_entry.values())
        if span > PAD_MAX_SPAN_PER_ENTRY * len(per_entry) or span * m > PAD_MAX_ROWS_PER_ROW * num_rows:
            return None
        if span * m == num_rows and [e for _, e in used] == list(range(lo, hi + 1)):
            return PaddedRows(lo, span, m, None)  # entries in order, each with m rows: the identity
        filled = dict.fromkeys(per_entry, 0)
        index = []
        for n, e in used:
            first = (e - lo) * m + filled[e]
            index.extend(range(first, first + n))
            filled[e] += n
        return PaddedRows(lo, span, m, torch.tensor(index, dtype=torch.long).to(device))

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, d] -> grid [entries, rows_per_entry, d] (zeros where no row sits)."""
        if self.index is None:
            return rows.reshape(self.entries, self.rows_per_entry, rows.shape[1])
        grid = rows.new_zeros(self.entries * self.rows_per_entry, rows.shape[1])
        return grid.index_copy_(0, self.index, rows).view(self.entries, self.rows_per_entry, rows.shape[1])

    def unpad(self, grid: torch.Tensor) -> torch.Tensor:
        """grid [entries, rows_per_entry, d] -> the served rows [n, d]."""
        flat = grid.reshape(self.entries * self.rows_per_entry, grid.shape[2])
        return flat if self.index is None else flat.index_select(0, self.index)


@dataclass(frozen=True)
class TokenGroups:
    """Rows of the batch that one rank class serves, sorted so each adapter's rows are contiguous.

    rows:        [n] long, batch row of each served token, or None when the rows are the
                 contiguous range `row_start .. row_start + n` (no gather/scatter needed).
    row_start:   first row when `rows` is None.
    num_rows:    n.
    seg_lens:    [G] long, number of rows of each segment (one segment per active adapter).
    seg_entries: [G] long, pool entry of each segment.
    row_entries: [n] long, pool entry of each row (the decode, one-token-per-request form).
    seg_offsets: G cumulative segment ends as int32 (the form `grouped_mm` takes).
    padded:      the rows as a grid over a range of pool entries, when that wastes little.
    first_entry: seg_entries[0] as a Python int (-1 without segments): the entry of a one-segment
                 group, read without a tensor op.
    """

    rows: torch.Tensor | None
    row_start: int
    num_rows: int
    seg_lens: torch.Tensor
    seg_entries: torch.Tensor
    row_entries: torch.Tensor
    seg_offsets: torch.Tensor
    padded: PaddedRows | None = None
    first_entry: int = -1

    @property
    def num_segments(self) -> int:
        return int(self.seg_lens.shape[0])

    @staticmethod
    def build(
        seg_row_starts: list[int], seg_lens: list[int], seg_entries: list[int], device: torch.device | str = "cpu"
    ) -> TokenGroups:
        """Groups from per-segment (first row, length, pool entry), segments in row order."""
        num_rows = sum(seg_lens)
        contiguous = all(
            seg_row_starts[i] + seg_lens[i] == seg_row_starts[i + 1] for i in range(len(seg_lens) - 1)
        )
        if contiguous:
            rows = None
            row_start = seg_row_starts[0] if seg_row_starts else 0
        else:
            rows = torch.cat(
                [torch.arange(s, s + n, dtype=torch.long) for s, n in zip(seg_row_starts, seg_lens)]
            ).to(device)
            row_start = 0
        lens = torch.tensor(seg_lens, dtype=torch.long)
        entries = torch.tensor(seg_entries, dtype=torch.long)
        return TokenGroups(
            rows=rows,
            row_start=row_start,
            num_rows=num_rows,
            seg_lens=lens.to(device),
            seg_entries=entries.to(device),
            row_entries=torch.repeat_interleave(entries, lens).to(device),
            seg_offsets=torch.cumsum(lens, 0).to(torch.int32).to(device),
            padded=PaddedRows.plan(seg_lens, seg_entries, device),
            first_entry=seg_entries[0] if seg_entries else -1,
        )

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> the served rows [n, d]."""
        if self.rows is None:
            return x[self.row_start : self.row_start + self.num_rows]
        return x.index_select(0, self.rows)

    def scatter_add_rows(self, y: torch.Tensor, update: torch.Tensor) -> None:
        """y[served rows] += update; y [T, out] (may be a column slice view), update [n, out]."""
        if self.rows is None:
            y[self.row_start : self.row_start + self.num_rows] += update
        else:
            y.index_add_(0, self.rows, update)
