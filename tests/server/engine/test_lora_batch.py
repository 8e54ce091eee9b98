"""RankTable (slot -> rank-class pool entry) and LoraBatch.build (rows of a step grouped by rank class,
with the ops that serve them)."""
from __future__ import annotations

import pytest
import torch

from loraplex.kernels import lora_reference, lora_torch
from loraplex.server.engine.lora_batch import LoraBatch, RankTable
from loraplex.server.engine.lora_layer import LoraLinear, store

OPS = lora_torch  # the ops a built batch carries (grouping does not depend on them)

# RankTable --------------------------------------------------------------------------------


def test_rank_table_assigns_entries_and_grows_by_doubling():
    table = RankTable()
    seen = []
    for slot in range(17):
        entry, grew = table.assign(slot, 8)
        seen.append(entry)
        assert grew == (slot in (0, 4, 8, 16)), slot
        assert table.entries[slot] == (8, entry)
        expected_cap = 4 if slot < 4 else 8 if slot < 8 else 16 if slot < 16 else 32
        assert table.capacity[8] == expected_cap
    assert sorted(seen) == list(range(17))  # every entry distinct, dense, below capacity
    assert max(seen) < table.capacity[8]


def test_a_reserving_table_makes_each_rank_class_once_at_full_size():
    table = RankTable(reserve=6)
    grew = [table.assign(slot, 8)[1] for slot in range(6)] + [table.assign(6, 16)[1]]
    assert grew == [True, False, False, False, False, False, True]
    assert table.capacity == {8: 6, 16: 6}
    table.release(2)
    assert table.assign(7, 8) == (2, False)


def test_rank_classes_have_their_own_entries_and_capacity():
    table = RankTable()
    assert table.assign(0, 4) == (0, True)
    assert table.assign(1, 16) == (0, True)  # entry 0 of another pool
    assert table.assign(2, 4) == (1, False)
    assert table.capacity == {4: 4, 16: 4}
    assert table.entries == {0: (4, 0), 1: (16, 0), 2: (4, 1)}


def test_released_entries_are_reused_without_growth():
    table = RankTable()
    entries = {slot: table.assign(slot, 2)[0] for slot in range(4)}
    table.release(2)
    assert 2 not in table.entries
    entry, grew = table.assign(7, 2)
    assert entry == entries[2] and not grew
    assert table.capacity[2] == 4
    # releasing everything and refilling never grows the pool
    for slot in list(table.entries):
        table.release(slot)
    got = {table.assign(10 + i, 2) for i in range(4)}
    assert {e for e, _ in got} == {0, 1, 2, 3} and not any(g for _, g in got)
    assert table.capacity[2] == 4


def test_assigning_a_slot_twice_raises():
    table = RankTable()
    table.assign(3, 4)
    with pytest.raises(ValueError, match="slot 3"):
        table.assign(3, 4)
    with pytest.raises(ValueError):
        table.assign(3, 8)  # not even in another rank class
    assert table.entries == {3: (4, 0)}
    table.release(3)
    assert table.assign(3, 8) == (0, True)


# LoraBatch.build --------------------------------------------------------------------------


def _tables(assignments: dict[str, list[tuple[int, int]]]) -> dict[str, RankTable]:
    """projection -> [(slot, rank), ...] assigned in that order."""
    tables = {}
    for proj, pairs in assignments.items():
        tables[proj] = RankTable()
        for slot, rank in pairs:
            tables[proj].assign(slot, rank)
    return tables


def _layout(groups):
    return (None if groups.rows is None else groups.rows.tolist(), groups.row_start, groups.num_rows,
            groups.seg_lens.tolist(), groups.seg_entries.tolist())


def test_all_base_batch_is_none():
    tables = _tables({"q_proj": [(0, 4)], "v_proj": [(0, 4)]})
    assert LoraBatch.build([-1, -1, -1], [5, 1, 3], tables, ops=OPS) is None
    assert LoraBatch.build([], [], tables, ops=OPS) is None


def test_slots_no_table_knows_give_none():
    tables = _tables({"q_proj": [(0, 4)]})
    assert LoraBatch.build([-1, 5], [2, 3], tables, ops=OPS) is None


def test_consecutive_sequences_of_one_slot_merge_into_one_segment():
    tables = _tables({"q_proj": [(0, 4), (1, 4)]})
    # rows: slot0 [0,3) [3,5) | slot1 [5,9) [9,10) | slot0 [10,15)
    batch = LoraBatch.build([0, 0, 1, 1, 0], [3, 2, 4, 1, 5], tables, ops=OPS)
    [(rank, g)] = batch.groups["q_proj"]
    assert rank == 4
    e0, e1 = tables["q_proj"].entries[0][1], tables["q_proj"].entries[1][1]
    assert _layout(g) == (None, 0, 15, [5, 5, 5], [e0, e1, e0])
    assert g.row_entries.tolist() == [e0] * 5 + [e1] * 5 + [e0] * 5


def test_base_rows_between_segments_give_an_index_and_stop_merging():
    tables = _tables({"q_proj": [(0, 4)]})
    # -1 rows in front and between two runs of slot 0: not merged, rows gathered
    batch = LoraBatch.build([-1, 0, -1, 0, 0], [2, 3, 1, 1, 1], tables, ops=OPS)
    [(_, g)] = batch.groups["q_proj"]
    assert _layout(g) == ([2, 3, 4, 6, 7], 0, 5, [3, 2], [0, 0])


def test_base_rows_only_in_front_keep_the_contiguous_fast_path():
    tables = _tables({"q_proj": [(0, 4), (1, 4)]})
    batch = LoraBatch.build([-1, -1, 0, 1], [1, 1, 1, 1], tables, ops=OPS)  # decode form
    [(_, g)] = batch.groups["q_proj"]
    assert _layout(g) == (None, 2, 2, [1, 1], [0, 1])


def test_different_ranks_land_in_different_rank_classes_sorted_by_rank():
    tables = _tables({"q_proj": [(0, 16), (1, 4), (2, 16)]})
    batch = LoraBatch.build([-1, 0, 1, 2], [2, 3, 4, 1], tables, ops=OPS)
    groups = batch.groups["q_proj"]
    assert [r for r, _ in groups] == [4, 16]
    (_, g4), (_, g16) = groups
    assert _layout(g4) == (None, 5, 4, [4], [tables["q_proj"].entries[1][1]])
    assert _layout(g16) == ([2, 3, 4, 9], 0, 4, [3, 1],
                            [tables["q_proj"].entries[0][1], tables["q_proj"].entries[2][1]])


def test_a_projection_the_adapter_does_not_target_has_no_group_for_it():
    # slot 0 adapts q and v, slot 1 only q; nothing in the batch adapts gate_proj
    tables = _tables({"q_proj": [(0, 4), (1, 8)], "v_proj": [(0, 4)], "gate_proj": [(7, 4)]})
    batch = LoraBatch.build([0, 1], [3, 2], tables, ops=OPS)
    assert set(batch.groups) == {"q_proj", "v_proj"}
    [(_, gv)] = batch.groups["v_proj"]
    assert _layout(gv) == (None, 0, 3, [3], [0])
    q_rows = sorted(r for _, g in batch.groups["q_proj"] for r in range(g.row_start, g.row_start + g.num_rows))
    assert q_rows == [0, 1, 2, 3, 4]
    # a batch of only slot 1 has no v_proj work at all
    batch = LoraBatch.build([-1, 1], [3, 2], tables, ops=OPS)
    assert set(batch.groups) == {"q_proj"}


def test_identical_layouts_share_one_token_groups_object():
    tables = _tables({"q_proj": [(0, 4), (1, 8)], "k_proj": [(0, 4), (1, 8)], "v_proj": [(0, 4), (1, 8)],
                      # same slots, but the rank-4 entry differs in o_proj (slot 9 took entry 0 first)
                      "o_proj": [(9, 4), (0, 4), (1, 8)]})
    batch = LoraBatch.build([0, 1, 0], [2, 2, 2], tables, ops=OPS)
    for rank_index in range(2):
        objs = [batch.groups[p][rank_index][1] for p in ("q_proj", "k_proj", "v_proj")]
        assert objs[0] is objs[1] is objs[2]
    assert batch.groups["q_proj"][0][1] is not batch.groups["q_proj"][1][1]  # rank 4 vs rank 8
    o4 = batch.groups["o_proj"][0][1]
    assert o4 is not batch.groups["q_proj"][0][1]
    assert o4.seg_entries.tolist() == [tables["o_proj"].entries[0][1]] * 2 == [1, 1]
    # rank-8 layout is the same in o_proj (entry 0), so it is shared as well
    assert batch.groups["o_proj"][1][1] is batch.groups["q_proj"][1][1]


def test_token_groups_follow_the_requested_device_and_dtypes():
    tables = _tables({"q_proj": [(0, 4), (1, 4)]})
    batch = LoraBatch.build([0, -1, 1], [3, 1, 3], tables, device="cpu", ops=OPS)
    [(_, g)] = batch.groups["q_proj"]
    assert g.rows.dtype == torch.long and g.seg_offsets.dtype == torch.int32
    assert g.seg_offsets.tolist() == [3, 6]


# LoraLinear over a built batch ------------------------------------------------------------


@pytest.mark.parametrize("ops", [lora_torch, lora_reference], ids=["torch", "reference"])
@pytest.mark.parametrize("rows_per_seq", [1, 4], ids=["decode", "prefill"])
def test_lora_linear_fused_slices_match_a_dense_per_row_update(ops, rows_per_seq):
    """A fused q/v layer with adapters of two ranks, one adapter not targeting v."""
    torch.manual_seed(0)
    in_f, outs = 24, {"q_proj": 16, "v_proj": 8}
    base = torch.nn.Linear(in_f, sum(outs.values()), bias=False)
    layer = LoraLinear(base, list(outs.items()), in_f)
    tables = {p: RankTable() for p in outs}
    adapters = {0: {"q_proj": 4, "v_proj": 4}, 1: {"q_proj": 8}, 2: {"q_proj": 4, "v_proj": 8}}
    weights = {}
    for slot, ranks in adapters.items():
        for proj, r in ranks.items():
            entry, grew = tables[proj].assign(slot, r)
            if grew:
                layer.ensure_capacity(proj, r, tables[proj].capacity[r], torch.float32, torch.device("cpu"))
            a, b = torch.randn(r, in_f), torch.randn(outs[proj], r)
            store(*layer.plan_write(proj, r, entry, a, b))
            weights[(slot, proj)] = (a, b)
    seq_slots = [-1, 2, 2, 0, 1, -1, 1]
    x = torch.randn(len(seq_slots) * rows_per_seq, in_f)
    batch = LoraBatch.build(seq_slots, [rows_per_seq] * len(seq_slots), tables, ops=ops)
    assert batch.ops is ops  # every layer runs the step on the ops its batch carries
    with torch.no_grad():
        y = layer(x, batch)
        expected = base(x)
    col = {"q_proj": 0, "v_proj": outs["q_proj"]}
    for b, slot in enumerate(seq_slots):
        for row in range(b * rows_per_seq, (b + 1) * rows_per_seq):
            for proj in outs:
                if (slot, proj) in weights:
                    a, bm = weights[(slot, proj)]
                    expected[row, col[proj] : col[proj] + outs[proj]] += bm @ (a @ x[row])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)  # float32
