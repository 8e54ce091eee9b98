"""Retention against the base itself, label-free: how much a tuned model still answers general
prompts the way its base does (`loraplex eval --retention`).

On general prompts in the model's chat format (the shipped `prompt_sets/general.jsonl`, 320
everyday instructions written for loraplex under the repository's Apache-2.0 licence, or a
user's own JSONL of {"prompt": ...} rows), the base's own greedy answers are the reference,
cached per base model. Teacher-forced on prompt + base answer, every answer token scores:

    kl_base_tuned    mean over answer tokens of KL(p_base || p_tuned), the full vocabulary,
                     temperature 1, float32                       (0: no change)
    retention        exp(mean over answer tokens of log p_tuned(t) - log p_base(t))
                                                                  (1: as likely as under the base)
    rouge_l_vs_base  ROUGE-L (0..100) of the tuned model's own greedy answers against the base's

A labelled general task says nothing when the base itself scores about 0 on it (SmolLM2 on
most); these figures need no labels, so they work on any base. A full fine-tune is scored the
same way, its engine in place of the adapter.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

GENERAL_PROMPTS = Path(__file__).with_name("prompt_sets") / "general.jsonl"
BATCH = 8  # requests per teacher-forced batch: 8 x ~100 positions x a 49k vocabulary in float32


def load_prompts(path: Path) -> list[str]:
    """The {"prompt": str} rows of a JSONL file."""
    prompts = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i + 1}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f'{path}:{i + 1}: each row must be {{"prompt": "..."}} with a non-empty string')
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _input(engine, prompt: str) -> dict:
    """The prompt as a chat user turn where the model has a chat template, else as text."""
    return {"messages": [{"role": "user", "content": prompt}]} if engine.tokenizer.chat_template else {"prompt": prompt}


def base_answers(engine, prompts: list[str], max_new_tokens: int, cache: Path | None) -> list[dict]:
    """The base's greedy answers as {"prompt_ids", "answer_ids", "text"}, from `cache` when it holds them."""
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    key = hashlib.sha256(json.dumps([str(engine.model_path), prompts, max_new_tokens]).encode()).hexdigest()[:16]
    path = cache / f"base-answers-{key}.json" if cache else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    requests = [engine.encode(Request(**_input(engine, p), params=SamplingParams(max_new_tokens=max_new_tokens)))
                for p in prompts]
    out = []
    for req, done in zip(requests, engine.generate(requests)):
        if done.error:
            raise ValueError(f"the base could not answer {req.prompt_token_ids[:8]}...: {done.error}")
        out.append({"prompt_ids": req.prompt_token_ids, "answer_ids": done.token_ids, "text": done.text.strip()})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def _answer_logprobs(engine, rows: list[dict], apply: dict) -> list[torch.Tensor]:
    """log_softmax [len(answer), vocab] float32 at the positions predicting each answer token."""
    from loraplex.server.engine.sequence import Request

    out = []
    for start in range(0, len(rows), BATCH):
        batch = rows[start:start + BATCH]
        logits = engine.prompt_logits([Request(prompt_token_ids=r["prompt_ids"] + r["answer_ids"], **apply)
                                       for r in batch])
        for r, lg in zip(batch, logits):
            n = len(r["prompt_ids"])
            out.append(torch.log_softmax(lg[n - 1:n - 1 + len(r["answer_ids"])].float(), dim=-1))
    return out


def retention(base, tuned, apply: dict, prompts: list[str], max_new_tokens: int, cache: Path | None) -> dict:
    """The three figures (module docstring) of `tuned` (an engine, with `apply`: its adapter or
    soft prompt) against `base` (an engine) on `prompts`."""
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    from .scoring import score

    rows = [r for r in base_answers(base, prompts, max_new_tokens, cache) if r["answer_ids"]]
    if not rows:
        raise ValueError("the base answered every prompt with nothing: no tokens to score")
    kl_sum, diff_sum, tokens = 0.0, 0.0, 0
    for r, lb, lt in zip(rows, _answer_logprobs(base, rows, {}), _answer_logprobs(tuned, rows, apply)):
        ids = torch.tensor(r["answer_ids"]).view(-1, 1)
        kl_sum += float((lb.exp() * (lb - lt)).sum())
        diff_sum += float((lt.gather(1, ids) - lb.gather(1, ids)).sum())
        tokens += len(r["answer_ids"])
    requests = [Request(prompt_token_ids=r["prompt_ids"], **apply, params=SamplingParams(max_new_tokens=max_new_tokens))
                for r in rows]
    answers = [done.text.strip() for done in tuned.generate(requests)]
    return {"prompts": len(rows), "answer_tokens": tokens, "max_new_tokens": max_new_tokens,
            "kl_base_tuned": kl_sum / tokens, "retention": float(torch.tensor(diff_sum / tokens).exp()),
            "rouge_l_vs_base": score(answers, [r["text"] for r in rows])["rougeL"]}
