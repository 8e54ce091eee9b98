"""Where each slot's weights sit in the rank pools, and which rows of a step use which slot.

Every projection type (q_proj, ..., down_proj) has a `RankTable`: an adapter in slot s with
rank r on that projection owns entry i of the rank-r pool, the same entry in every layer
(an adapter whose rank varies across layers, through `rank_pattern`, takes its largest rank
there and its smaller layers are zero-padded inside its own entry: exact, and the padding
never spreads to other adapters). Pools grow by doubling when a rank class fills up, or, with
`reserve` (on a CPU, one entry per slot), are created at their full size once: there the pool
is allocated without touching it, so only entries written take memory, and no later growth
copies the pool inside a step (growing a rank-64 pool from 8 to 16 entries took ~300 ms).

`LoraBatch` is built once per step and shared by all layers: for each projection type, the
`TokenGroups` of each rank class present in the batch, and the step's `LoraOps` (the reference,
torch or Triton path) that serve them, so a layer's forward takes `(x, batch)` and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.kernels import LoraOps, TokenGroups


class RankTable:
    """slot -> (rank, pool entry) for one projection type."""

    def __init__(self, reserve: int | None = None) -> None:
        self.reserve = reserve
        self.entries: dict[int, tuple[int, int]] = {}
        self.capacity: dict[int, int] = {}
        self._free: dict[int, list[int]] = {}

    def assign(self, slot: int, rank: int) -> tuple[int, bool]:
        """Give `slot` an entry in the rank-`rank` pool; returns (entry, whether capacity grew)."""
        if slot in self.entries:
            raise ValueError(f"slot {slot} already holds an adapter")
        grew = not self._free.get(rank)
        if grew:
            self.grow(rank)
        entry = self._free[rank].pop()
        self.entries[slot] = (rank, entry)
        return entry, grew

    def grow(self, rank: int) -> None:
        """Add free entries to the rank-`rank` class: double it, or with `reserve` make all of them
        at once (one per slot, so it never needs more). The pools must then be grown to
        `capacity[rank]`."""
        old = self.capacity.get(rank, 0)
        new = max(4, 2 * old) if old or not self.reserve else self.reserve
        self._free.setdefault(rank, []).extend(range(new - 1, old - 1, -1))
        self.capacity[rank] = new

    def free_entries(self, rank: int) -> tuple[int, ...]:
        """The free entries of the rank-`rank` class, the next one `assign` gives last. A snapshot,
        safe to take from another thread."""
        return tuple(self._free.get(rank, ()))

    def release(self, slot: int) -> None:
        rank, entry = self.entries.pop(slot)
        self._free[rank].append(entry)


@dataclass
class LoraBatch:
    """The rows of one step grouped by rank class, per projection type, and the ops that serve them."""

    ops: LoraOps
    groups: dict[str, list[tuple[int, TokenGroups]]] = field(default_factory=dict)

    @staticmethod
    def build(
        seq_slots: list[int],
        seq_num_rows: list[int],
        tables: dict[str, RankTable],
        device: torch.device | str = "cpu",
        *,
        ops: LoraOps,
    ) -> "LoraBatch | None":
        """seq_slots[b] is sequence b's slot (-1: none); its rows follow the previous sequence's.
        `ops`: the path every layer runs this batch's updates on.

        Consecutive sequences of one slot merge into one segment, so the runner orders the
        batch by slot to get one segment per adapter.
        """
        if all(s < 0 for s in seq_slots):
            return None
        # (slot, first row, rows) runs of consecutive sequences sharing a slot
        runs: list[list[int]] = []
        row = 0
        for slot, n in zip(seq_slots, seq_num_rows):
            if slot >= 0 and runs and runs[-1][0] == slot and runs[-1][1] + runs[-1][2] == row:
                runs[-1][2] += n
            elif slot >= 0:
                runs.append([slot, row, n])
            row += n
        batch = LoraBatch(ops)
        built: dict[tuple, TokenGroups] = {}  # projections with the same layout share their groups
        for proj, table in tables.items():
            by_rank: dict[int, tuple[list[int], list[int], list[int]]] = {}
            for slot, start, n in runs:
                if slot not in table.entries:
                    continue
                rank, entry = table.entries[slot]
                starts, lens, entries = by_rank.setdefault(rank, ([], [], []))
                starts.append(start)
                lens.append(n)
                entries.append(entry)
            for rank, (starts, lens, entries) in sorted(by_rank.items()):
                key = (tuple(starts), tuple(lens), tuple(entries))
                if key not in built:
                    built[key] = TokenGroups.build(starts, lens, entries, device)
                batch.groups.setdefault(proj, []).append((rank, built[key]))
        return batch if batch.groups else None
