"""Retention against the base itself (trainer/retention.py), on the tiny model: the base against
itself changes nothing; an adapter trained to overwrite general behaviour (many steps at a high
learning rate on one repeated answer) moves the base's answers far more than a gentle one; and
`loraplex eval --retention --json` carries the figures under stable names."""
from __future__ import annotations

import json

import pytest

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.trainer.retention import GENERAL_PROMPTS, load_prompts, retention

PROMPTS = 12  # of the shipped set, enough for a stable mean on the tiny model
NEW_TOKENS = 8
LORA = ["--method", "lora", "--rank", "4", "--batch-size", "8", "--no-eval", "--logging-steps", "5"]


@pytest.fixture(scope="module")
def adapters(tiny_model, task_file, run_train, trainer_data, tmp_path_factory):
    """gentle: a few small steps on the task; overwrite: many large steps on one repeated answer."""
    root = tmp_path_factory.mktemp("retention")
    same = trainer_data.write_jsonl(root / "same.jsonl", [{"instruction": f"say something {i}", "input": "",
                                                           "output": "fox fox fox fox"} for i in range(32)])
    assert run_train("--model", tiny_model, "--data", task_file, "--out", root / "gentle", *LORA,
                     "--max-steps", "4", "--lr", "1e-3") == 0
    assert run_train("--model", tiny_model, "--data", same, "--out", root / "overwrite", *LORA,
                     "--max-steps", "60", "--lr", "5e-2", "--target-modules",
                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj") == 0
    return {"gentle": root / "gentle", "overwrite": root / "overwrite"}


@pytest.fixture(scope="module")
def base(tiny_model) -> Engine:
    return Engine(EngineConfig(model=str(tiny_model)))


def figures(base, tiny_model, adapter, tmp_path) -> dict:
    tuned = Engine(EngineConfig(model=str(tiny_model)))
    tuned.register_adapter("tuned", str(adapter))
    prompts = load_prompts(GENERAL_PROMPTS)[:PROMPTS]
    return retention(base, tuned, {"adapter": "tuned"}, prompts, NEW_TOKENS, tmp_path)


def test_the_shipped_prompt_set_is_a_few_hundred_distinct_instructions():
    prompts = load_prompts(GENERAL_PROMPTS)
    assert 200 <= len(prompts) <= 500 and len(set(prompts)) == len(prompts)


def test_the_base_against_itself_changes_nothing(base, tmp_path):
    prompts = load_prompts(GENERAL_PROMPTS)[:PROMPTS]
    r = retention(base, base, {}, prompts, NEW_TOKENS, tmp_path)
    assert r["answer_tokens"] > 0 and r["prompts"] <= PROMPTS
    assert abs(r["kl_base_tuned"]) <= 1e-6 and abs(r["retention"] - 1) <= 1e-6 and r["rouge_l_vs_base"] == 100


def test_overwriting_moves_the_base_far_more_than_a_gentle_adapter(base, tiny_model, adapters, tmp_path):
    gentle = figures(base, tiny_model, adapters["gentle"], tmp_path)
    overwrite = figures(base, tiny_model, adapters["overwrite"], tmp_path)
    assert gentle["kl_base_tuned"] > 0 and overwrite["kl_base_tuned"] >= 10 * gentle["kl_base_tuned"], (gentle,
                                                                                                       overwrite)
    assert overwrite["retention"] < gentle["retention"] <= 1.5
    assert overwrite["rouge_l_vs_base"] < gentle["rouge_l_vs_base"]


def test_base_answers_are_cached_per_base_model(base, tmp_path):
    prompts = load_prompts(GENERAL_PROMPTS)[:3]
    first = retention(base, base, {}, prompts, NEW_TOKENS, tmp_path)
    [cached] = tmp_path.glob("base-answers-*.json")
    assert len(json.loads(cached.read_text())) == 3
    assert retention(base, base, {}, prompts, NEW_TOKENS, tmp_path) == first


def test_eval_reports_retention_under_stable_names(tiny_model, task_file, adapters, tmp_path, trainer_data, capsys,
                                                   monkeypatch):
    from loraplex.trainer.evaluate import main as eval_main

    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    prompts = trainer_data.write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "name a colour"}, {"prompt": "say hi"}])
    out = tmp_path / "report"
    assert eval_main(["--model", str(tiny_model), "--adapter", str(adapters["gentle"]), "--data", str(task_file),
                      "--retention", str(prompts), "--limit", "4", "--max-new-tokens", "6", "--out", str(out),
                      "--json"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["retention"]) == {"file", "prompts", "answer_tokens", "max_new_tokens", "kl_base_tuned",
                                        "retention", "rouge_l_vs_base"}
    assert report["retention"]["prompts"] <= 2 and "retention against the base" in (out / "eval.md").read_text()
    capsys.readouterr()


@pytest.mark.parametrize("content, fragment", [
    ('{"prompt": ""}\n', "non-empty string"), ("not json\n", "not JSON"), ('{"text": "hi"}\n', "must be"),
    ("", "no prompts"),
])
def test_a_malformed_prompt_file_is_refused_by_line(tiny_model, task_file, adapters, tmp_path, capsys, content,
                                                     fragment):
    from loraplex.trainer.evaluate import main as eval_main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert eval_main(["--model", str(tiny_model), "--adapter", str(adapters["gentle"]), "--data", str(task_file),
                      "--retention", str(bad), "--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 2
    assert fragment in capsys.readouterr().err
