"""`loraplex eval`'s scores reproduce rouge-score and sacrebleu called directly."""
from __future__ import annotations

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from loraplex.trainer.evaluate import main as eval_main
from loraplex.trainer.scoring import score

PREDICTIONS = ["the cats were running across the garden", "a red apple fell", "hello world", "SELECT name FROM users"]
REFERENCES = ["the cat ran across the garden", "an apple fell from the tree", "hello world", "SELECT id FROM users"]


def test_scores_match_the_reference_libraries():
    got = score(PREDICTIONS, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        direct = [scorer.score(r, p)[key].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)]
        assert got[key] == pytest.approx(100 * sum(direct) / len(direct), abs=1e-9)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert got["exact_match"] == 25.0
    assert got["n"] == 4
    # stemming is on: "cats ... running" matches "cat ... ran" partly through "cat"
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(REFERENCES[0], PREDICTIONS[0])
    assert scorer.score(REFERENCES[0], PREDICTIONS[0])["rouge1"].fmeasure > plain["rouge1"].fmeasure


def test_exact_match_ignores_surrounding_whitespace_only():
    assert score([" hello  world\n"], ["hello world"])["exact_match"] == 100.0
    assert score(["Hello world"], ["hello world"])["exact_match"] == 0.0


def test_mismatched_lengths_refused():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score(["a", "b"], ["a"])


def test_eval_cli_refuses_bad_rows_and_flags(tmp_path, tiny_model, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + '{"prompt": "a"}\n', encoding="utf-8")
    assert eval_main(["--model", str(tiny_model), "--data", str(data)]) == 2
    assert f"{data}:2: a row needs" in capsys.readouterr().err
    assert eval_main(["--model", str(tiny_model), "--data", str(data), "--base-shots", "-1"]) == 2
    assert "--base-shots must be positive" in capsys.readouterr().err
    assert eval_main(["--model", str(tiny_model), "--data", str(data), "--adapter", str(tmp_path / "none")]) == 2
    assert "is not a directory" in capsys.readouterr().err
