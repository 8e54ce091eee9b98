"""Launch metadata for `lora_triton`'s ops: what a launch needs from the step's `TokenGroups`.

Host work per call: the first call with a given tuple of `TokenGroups` reads every problem's
longest segment (for the grid), largest pool entry and batch row (checked against the tensors,
so a bad index raises instead of reading out of bounds) in one transfer, memoised for that
tuple: a step's groups are shared by every layer, so this happens once per step and layer
kind, not per layer. The per-problem table is cached by content (pool addresses do not move
between steps), so it is copied to the device once per layer and batch composition.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from .lora_groups import TokenGroups


class LaunchMeta:
    """What a launch needs from a tuple of TokenGroups (one per problem), on the device, plus
    host-side bounds per problem. Segments of every problem are concatenated, problem after problem."""

    __slots__ = ("rows", "seg_problem", "seg_lens", "seg_starts", "seg_entries", "num_segments", "max_seg_len",
                 "row_bases", "max_entries", "max_rows")

    def __init__(self, groups: Sequence[TokenGroups], device: torch.device) -> None:
        rows, seg_problem, seg_lens, seg_entries, seg_starts = [], [], [], [], []
        self.row_bases: list[int] = []  # index in `rows` of each problem's first row
        base = 0
        for p, g in enumerate(groups):
            n = g.num_rows
            if g.rows is None:  # contiguous served rows: index them through an arange
                rows.append(torch.arange(g.row_start, g.row_start + n, dtype=torch.long, device=device))
            else:
                rows.append(g.rows.to(device=device, dtype=torch.long))
            if rows[-1].numel() != n:
                raise ValueError(f"groups[{p}].rows has {rows[-1].numel()} rows but num_rows={n}")
            lens = g.seg_lens.to(device=device, dtype=torch.long)
            seg_lens.append(lens)
            seg_starts.append(torch.cumsum(lens, 0) - lens)  # first served row within the problem
            seg_entries.append(g.seg_entries.to(device=device, dtype=torch.long))
            seg_problem.append(torch.full((g.num_segments,), p, dtype=torch.long, device=device))
            self.row_bases.append(base)
            base += n
        cat = (lambda ts: torch.cat(ts).contiguous()) if groups else (
            lambda ts: torch.empty(0, dtype=torch.long, device=device))
        self.rows, self.seg_problem, self.seg_lens = cat(rows), cat(seg_problem), cat(seg_lens)  # [sum n], [G], [G]
        self.seg_starts, self.seg_entries = cat(seg_starts), cat(seg_entries)  # [G], [G]
        self.num_segments = int(self.seg_lens.shape[0])
        self.max_seg_len = 0
        self.max_entries, self.max_rows = [-1] * len(groups), [-1] * len(groups)
        self._bounds(groups, rows, seg_lens, seg_entries)

    def _bounds(self, groups, rows, seg_lens, seg_entries) -> None:
        """The single host synchronisation: every problem's bounds, read in one transfer."""
        stats = []
        for g, r, lens, entries in zip(groups, rows, seg_lens, seg_entries):
            if g.num_segments:
                stats.append(torch.stack([lens.max(), lens.sum(), lens.min(), entries.max(), entries.min()]))
                if g.num_rows:
                    stats.append(torch.stack([r.max(), r.min()]))
        values = torch.cat(stats).tolist() if stats else []
        for p, g in enumerate(groups):
            if not g.num_segments:
                if g.num_rows:
                    raise ValueError(f"groups[{p}] have no segment but num_rows={g.num_rows}")
                continue
            max_len, total, min_len, self.max_entries[p], min_entry = values[:5]
            values = values[5:]
            min_row = 0
            if g.num_rows:
                self.max_rows[p], min_row = values[:2]
                values = values[2:]
            if min_len < 0 or min_entry < 0 or min_row < 0:
                raise ValueError(f"groups hold a negative length, pool entry or row: seg_lens "
                                 f"{g.seg_lens.tolist()}, seg_entries {g.seg_entries.tolist()}")
            if total != g.num_rows:
                raise ValueError(f"groups are inconsistent: seg_lens sum to {total} but num_rows={g.num_rows}")
            self.max_seg_len = max(self.max_seg_len, max_len)


_META: dict[tuple[int, ...], LaunchMeta] = {}


def launch_meta(groups: Sequence[TokenGroups], device: torch.device) -> LaunchMeta:
    """The launch metadata of this tuple of groups on `device`, built once per tuple (see the module doc)."""
    for p, g in enumerate(groups):
        for name in ("rows", "seg_lens", "seg_entries"):
            t = getattr(g, name)
            if t is not None and t.device != device:
                raise ValueError(f"groups[{p}].{name} is on {t.device} but the tensors are on {device}: build "
                                 f"the TokenGroups with device={str(device)!r}")
    key = tuple(id(g) for g in groups)  # groups are frozen; the metadata leaves with any of its objects
    meta = _META.get(key)
    if meta is None:
        meta = LaunchMeta(groups, device)
        for g in set(groups):
            weakref.finalize(g, _META.pop, key, None)
        _META[key] = meta
    return meta


_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 4096


def problem_table(device: torch.device, rows: list[tuple[int, ...]]) -> torch.Tensor:
    """The per-problem table [P, width] int64 on `device`, cached by content: pool addresses are
    stable between steps, so a layer's table is copied to the device once, not every step."""
    key = (device, tuple(rows))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = torch.tensor(rows, dtype=torch.long).to(device)
        _TABLES[key] = table
    return table
