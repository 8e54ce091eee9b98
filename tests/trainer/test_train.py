"""`loraplex train` on the tiny model: the loss falls; LoRA, QLoRA and prompt-tuning outputs load in
`peft` and in loraplex with equal greedy outputs; a full fine-tune is a servable model; --resume
continues a run exactly; bad rows and flags are refused precisely."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request
from loraplex.trainer.data import load_jsonl
from loraplex.trainer.prompts import PromptFormat
from loraplex.trainer.templates import load_template, served_template

STEPS = 8  # greedy tokens compared
ATOL = {"none": 1e-4, "nf4": 1e-3}  # on logits; NF4 adds bitsandbytes' dequantization to the sums
METHODS = {
    "lora": ["--max-steps", "30", "--lr", "1e-2", "--rank", "4", "--target-modules", "q_proj,v_proj,up_proj,down_proj"],
    "qlora": ["--max-steps", "20", "--lr", "1e-2", "--rslora"],
    "prompt-tuning": ["--max-steps", "30", "--lr", "0.1", "--virtual-tokens", "4", "--init-text", "reverse the words"],
}


@pytest.fixture(scope="module")
def trained(tiny_model, task_file, run_train, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    for method, extra in METHODS.items():
        status = run_train("--model", tiny_model, "--data", task_file, "--method", method, "--out", root / method,
                           "--batch-size", "8", "--logging-steps", "5", "--no-eval", *extra)
        assert status == 0, method
    return {method: root / method for method in METHODS}


def _record(out) -> dict:
    return json.loads((out / "training_args.json").read_text())


@pytest.mark.parametrize("method", list(METHODS))
def test_training_lowers_the_loss(trained, method):
    record = _record(trained[method])
    log = [json.loads(line) for line in (trained[method] / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 3 and all("learning_rate" in e for e in log if "loss" in e)
    assert losses[-1] < 0.9 * losses[0], losses
    assert record["final_loss"] == losses[-1] and record["global_step"] == int(METHODS[method][1])
    assert 0 < record["trainable_share"] < 0.2
    assert record["peak_memory_bytes"] > 0 and record["weights_bytes"] > 0
    assert not (trained[method] / "checkpoints").exists()  # removed after a successful run


def _hf_model(model_dir, adapter, quantize: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantize == "nf4":
        kwargs.update(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    for module in model.modules():  # the float kernel loraplex uses (see server/engine/quantize.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(model, adapter).eval()


@torch.no_grad()
def _hf_greedy(model, ids: list[int]) -> tuple[list[int], list[float], torch.Tensor]:
    tokens, margins = [], []
    for _ in range(STEPS):
        last = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1]
        top = torch.topk(last, 2).values
        margins.append(float(top[0] - top[1]))
        tokens.append(int(last.argmax()))
    logits = model(input_ids=torch.tensor([ids + tokens])).logits[0]
    return tokens, margins, logits[-len(ids + tokens):]


@pytest.mark.parametrize("method", list(METHODS))
def test_output_loads_in_peft_and_loraplex_with_equal_greedy_outputs(trained, tiny_model, task_file, method):
    out = trained[method]
    quantize = "nf4" if method == "qlora" else "none"
    atol = ATOL[quantize]
    engine = Engine(EngineConfig(model=str(tiny_model), quantize=quantize, max_total_tokens=2048, block_size=4))
    entry = engine.register_adapter("tuned", str(out))
    field = "soft_prompt" if method == "prompt-tuning" else "adapter"
    assert entry.kind == ("soft_prompt" if method == "prompt-tuning" else "lora")
    fmt = PromptFormat(load_template("flan"), chat=True)
    prompts = [fmt.prompt_ids(engine.tokenizer, ex) for ex in load_jsonl(task_file)[:4]]
    results = engine.generate([Request(prompt_token_ids=ids, params=SamplingParams(max_new_tokens=STEPS, ignore_eos=True),
                                       **{field: "tuned"}) for ids in prompts])
    reference = _hf_model(tiny_model, out, quantize)
    for ids, result in zip(prompts, results):
        assert result.error is None
        tokens, margins, ref_logits = _hf_greedy(reference, ids)
        n = next((i for i, m in enumerate(margins) if m < 2 * atol), STEPS)
        assert n >= STEPS // 2, margins
        assert result.token_ids[:n] == tokens[:n]
        forced = Request(prompt_token_ids=ids + tokens, **{field: "tuned"})
        got, base = engine.prompt_logits([forced, Request(prompt_token_ids=ids + tokens)])
        torch.testing.assert_close(got, ref_logits, atol=atol, rtol=0)
        assert (got - base).abs().max() > 0.1  # the trained adapter changes the model


def test_served_template_is_written_beside_the_adapter(trained, trainer_data):
    for method in ("lora", "prompt-tuning"):
        template = (trained[method] / "loraplex_template.txt").read_text()
        assert template == served_template(load_template("flan").served, trainer_data.instruction)
        assert _record(trained[method])["chat"] is True


def test_full_fine_tune_is_a_servable_model(tiny_model, task_file, run_train, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert run_train("--model", tiny_model, "--data", task_file, "--method", "full", "--out", out, "--max-steps", "6",
                     "--lr", "1e-3", "--no-eval") == 0
    assert _record(out)["trainable_share"] == 1.0
    tuned = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert tuned.keys() == base.keys()
    assert all((tuned[k] != base[k]).any() for k in base if k.endswith("q_proj.weight"))
    engine = Engine(EngineConfig(model=str(out), max_total_tokens=512, block_size=4))
    ids = [5, 17, 42, 99]
    got = engine.generate([Request(prompt_token_ids=ids, params=SamplingParams(max_new_tokens=4, ignore_eos=True))])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expect = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, min_new_tokens=4)[0, 4:].tolist()
    assert got[0].token_ids == expect


def test_qlora_training_is_unchanged_by_evaluations_and_checkpoints(tiny_model, task_file, run_train, tmp_path):
    """A regression test: bitsandbytes repacked 4-bit weights for its CPU inference kernel during the
    first evaluation and left them packed, so QLoRA training diverged right after it."""
    losses = {}
    for save_steps in ("4", "1000"):  # evaluation and checkpoint at step 4, or never
        out = tmp_path / f"save-{save_steps}"
        assert run_train("--model", tiny_model, "--data", task_file, "--method", "qlora", "--max-steps", "8",
                         "--save-steps", save_steps, "--logging-steps", "1", "--lr", "1e-2", "--no-eval",
                         "--out", out) == 0
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        losses[save_steps] = [e["loss"] for e in log if e.get("loss") is not None]
        evaluated_at_4 = any("eval_loss" in e and e.get("step") == 4 for e in log)
        assert evaluated_at_4 == (save_steps == "4")
    assert len(losses["4"]) == 8 and losses["4"] == losses["1000"]


def test_resume_continues_from_the_last_checkpoint(tiny_model, task_file, run_train, tmp_path, capsys):
    args = ["--model", tiny_model, "--data", task_file, "--method", "lora", "--max-steps", "6", "--save-steps", "3",
            "--logging-steps", "1", "--lr", "1e-2", "--no-eval", "--keep-checkpoints"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_train(*args, "--out", whole) == 0
    # a run stopped after step 3 leaves what this one left at step 3
    shutil.copytree(whole / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    assert run_train(*args, "--out", resumed, "--resume") == 0
    record = _record(resumed)
    assert record["resumed_from"].endswith("checkpoint-3") and record["global_step"] == 6
    steps = [json.loads(line)["step"] for line in (resumed / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [4, 5, 6]
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)

    capsys.readouterr()
    assert run_train(*args, "--out", whole) == 2  # checkpoints there, no --resume
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert run_train(*args, "--out", tmp_path / "fresh", "--resume") == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_malformed_row_stops_with_its_line_number(tiny_model, task_file, run_train, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = task_file.read_text().splitlines()
    bad.write_text("\n".join(lines[:4] + ['{"instruction": "x", "output": 5}'] + lines[4:]) + "\n")
    assert run_train("--model", tiny_model, "--method", "lora", "--data", task_file, "--data", f"{bad}:2",
                     "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"{bad}:5: 'output' must be a string, got int" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--method", "lora", "--virtual-tokens", "4"], "--virtual-tokens apply to --method prompt-tuning"),
    (["--method", "prompt-tuning", "--rank", "4"], "--rank apply to --method lora/qlora"),
    (["--method", "prompt-tuning", "--prompt-init", "text"], "--prompt-init text needs --init-text"),
    (["--method", "lora", "--register", "127.0.0.1:1"], "--register needs --endpoint"),
    (["--method", "full", "--register", "127.0.0.1:1", "--endpoint", "e"], "not registered"),
    (["--method", "lora", "--template", "missing"], "no template file 'missing'"),
])
def test_flags_that_do_not_go_together_are_refused(tiny_model, task_file, run_train, tmp_path, capsys, flags, message):
    assert run_train("--model", tiny_model, "--data", task_file, "--out", tmp_path / "o", *flags) == 2
    assert message in capsys.readouterr().err


def test_eval_scores_base_and_tuned_side_by_side(trained, task_file, tiny_model, tmp_path, trainer_data, capsys):
    from loraplex.trainer.evaluate import main as eval_main

    general = trainer_data.write_jsonl(tmp_path / "general.jsonl",
                                       [{"prompt": f"hello world {i}", "completion": "hello"} for i in range(4)])
    out = tmp_path / "report"
    assert eval_main(["--model", str(tiny_model), "--adapter", str(trained["qlora"]), "--data", str(task_file),
                      "--general-data", str(general), "--base-shots", "2", "--limit", "6", "--max-new-tokens", "8",
                      "--out", str(out), "--json"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["tuned_kind"] == "lora" and report["tuned_quantize"] == "nf4"  # QLoRA: on its NF4 base
    assert report["chat"] is True and report["template"] == "flan"  # the adapter's training format
    task, gen = report["tasks"]["task"], report["tasks"]["general"]
    assert task["n"] == 6 and set(task["scores"]) == {"base", "base_2shot", "tuned"}
    assert set(gen["scores"]) == {"base", "tuned"} and gen["n"] == 4
    for scores in (*task["scores"].values(), *gen["scores"].values()):
        assert set(scores) == {"rouge1", "rouge2", "rougeL", "bleu", "exact_match", "n"}
        assert all(0 <= scores[k] <= 100 for k in ("rouge1", "rougeL", "bleu", "exact_match"))
    assert "| tuned |" in (out / "eval.md").read_text()
