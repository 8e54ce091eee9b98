"""JSONL rows: the three shapes, bad rows named by line, the seeded split and weighted mixing."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from loraplex.trainer.data import DataError, Example, load_jsonl, mix, parse_data_arg, split


def _file(tmp_path, lines: list[str]):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"instruction": "say hi", "output": "hi"})


def test_three_shapes_load(tmp_path):
    rows = load_jsonl(_file(tmp_path, [
        json.dumps({"instruction": "add", "input": "1 2", "output": "3"}),
        "",
        json.dumps({"prompt": "2+2=", "completion": "4"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
    ]))
    assert [r.answer for r in rows] == ["3", "4", "hello"]
    assert rows[0].instruction == "add" and rows[0].input == "1 2"
    assert rows[1].prompt == "2+2="
    assert rows[2].messages == (("user", "hi"),)
    assert {r.task for r in rows} == {"rows"}
    assert [Example(**{**r.__dict__}).to_row() for r in rows][2]["messages"][-1]["role"] == "assistant"


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"instruction": "x"}), "a row needs 'instruction' and 'output'"),
    (json.dumps({"instruction": "x", "output": 3}), "'output' must be a string, got int"),
    (json.dumps({"instruction": "x", "output": "  "}), "'output' is empty"),
    (json.dumps({"instruction": "x", "output": "y", "label": 1}), "unknown field(s) label"),
    (json.dumps({"prompt": "p", "completion": "c", "input": "i"}), "unknown field(s) input"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "at least two turns"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}]}),
     "last message must be a non-empty assistant turn"),
    (json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "r"}]}),
     "messages[0] has role 'bot'"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "r"}]}),
     "no user turn"),
])
def test_bad_row_names_its_line(tmp_path, bad, message):
    path = _file(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_unreadable_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no rows"):
        load_jsonl(_file(tmp_path, ["", "  "]))
    (tmp_path / "latin.jsonl").write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8"):
        load_jsonl(tmp_path / "latin.jsonl")


def test_split_is_seeded_and_disjoint():
    rows = [Example(str(i), prompt=f"p{i}") for i in range(50)]
    a = split(rows, seed=1)
    assert split(rows, seed=1) == a
    assert split(rows, seed=2) != a
    train, val, test = a
    assert (len(train), len(val), len(test)) == (40, 5, 5)
    assert sorted(r.answer for part in a for r in part) == sorted(r.answer for r in rows)


def test_mix_draws_by_weight_and_covers_each_task():
    big = [Example(f"a{i}", prompt="a", task="a") for i in range(100)]
    small = [Example(f"b{i}", prompt="b", task="b") for i in range(10)]
    mixed = mix([(big, 1.0), (small, 3.0)], seed=0, size=2000)
    counts = Counter(ex.task for ex in mixed)
    assert 0.70 < counts["b"] / 2000 < 0.80  # weight 3 of 4
    # a task's rows are drawn round by round, so each small-task row appears about equally often
    per_row = Counter(ex.answer for ex in mixed if ex.task == "b")
    assert max(per_row.values()) - min(per_row.values()) <= 1
    assert mix([(big, 1.0), (small, 3.0)], seed=0, size=2000) == mixed
    assert len(mix([(big, 1.0), (small, 1.0)], seed=0)) == 110


def test_data_argument_weights():
    assert parse_data_arg("a.jsonl") == ("a.jsonl", 1.0)
    assert parse_data_arg("dir/a.jsonl:2.5") == ("dir/a.jsonl", 2.5)
    assert parse_data_arg("c:/x.jsonl") == ("c:/x.jsonl", 1.0)
    with pytest.raises(ValueError, match="must be positive"):
        parse_data_arg("a.jsonl:0")
