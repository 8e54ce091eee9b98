"""`loraplex eval`: the base model and the tuned one side by side, scored with ROUGE, BLEU and
exact match.

Generation runs through loraplex's own engine (greedy), so the figures are those of the served
model. The tuned side is a PEFT adapter directory (LoRA or soft prompt; a QLoRA adapter is
served on the NF4 base it was trained on) or a full model directory (`--method full`). The
prompt format (template, chat or plain) is the one the adapter was trained with, read from its
`training_args.json`, unless given. `--base-shots K` also scores the base model with K solved
examples in front of each prompt (the fair baseline for an instruction-following model);
`--general-data` scores an unrelated task before and after, to show forgetting or its absence.

Exit status: 0 done, 2 for unusable arguments, data or model.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .data import DataError, Example, load_jsonl
from .prompts import PromptFormat, default_chat
from .retention import GENERAL_PROMPTS, load_prompts, retention
from .scoring import METRICS, score
from .templates import TemplateError, load_template, parse_template

RUN_INFO = "training_args.json"
REPORT_JSON = "eval.json"
REPORT_MD = "eval.md"
MEASURABLE_ROUGE_L = 5.0  # a base below this on a labelled task leaves no room to show a drop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: Hugging Face directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", metavar="DIR", help="the tuned side: a PEFT adapter or a full model directory")
    p.add_argument("--data", required=True, metavar="FILE", help="the task's test rows (JSONL)")
    p.add_argument("--general-data", metavar="FILE", help="an unrelated task, scored before and after")
    p.add_argument("--retention", nargs="?", const=str(GENERAL_PROMPTS), metavar="FILE",
                   help="label-free retention against the base on general prompts (default: the shipped "
                        "320, trainer/prompt_sets/general.jsonl): KL, likelihood ratio, ROUGE-L vs the base")
    p.add_argument("--template", metavar="NAME|FILE", help="default: the adapter's training template, else plain")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="chat", action="store_true", default=None, help="prompts as chat user turns")
    fmt.add_argument("--plain", dest="chat", action="store_false", help="prompts as plain text")
    p.add_argument("--base-shots", type=int, default=0, metavar="K",
                   help="also score the base with K solved examples in front of each prompt")
    p.add_argument("--shots-data", metavar="FILE", help="where the solved examples come from (default: --data's other rows)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N rows of each file")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--out", metavar="DIR", help="where eval.json and eval.md go (default: the adapter "
                                                "directory, else the current one)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    return p


@dataclass
class Tuned:
    """The tuned side: which engine, and what to apply on it."""

    kind: str  # "lora" | "soft_prompt" | "full"
    path: Path
    quantize: str = "none"


def run_info(adapter: Path | None) -> dict:
    if adapter is None or not (adapter / RUN_INFO).is_file():
        return {}
    try:
        return json.loads((adapter / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def tuned_side(adapter: Path) -> Tuned:
    if (adapter / "adapter_config.json").is_file():
        from loraplex.server.engine.adapters import adapter_kind, read_adapter_config

        kind = adapter_kind(read_adapter_config(adapter))
        quantize = "nf4" if run_info(adapter).get("method") == "qlora" else "none"
        return Tuned(kind, adapter, quantize)
    if (adapter / "config.json").is_file():
        return Tuned("full", adapter)
    raise ValueError(f"{adapter}: neither a PEFT adapter (adapter_config.json) nor a model directory (config.json)")


class Scorer:
    """Holds the engines and generates greedily for lists of examples."""

    def __init__(self, model: str | None, tuned: Tuned | None, fmt: PromptFormat, max_new_tokens: int,
                 threads: int | None = None) -> None:
        from loraplex.server.engine.config import EngineConfig
        from loraplex.server.engine.engine import Engine

        def engine(path, quantize="none"):
            return Engine(EngineConfig(model=None if path is None else str(path), quantize=quantize, threads=threads))

        self.fmt = fmt
        self.max_new_tokens = max_new_tokens
        self.base = engine(model)
        self.tuned_engine = self.base
        self.apply: dict = {}
        if tuned is not None:
            if tuned.kind == "full":
                self.tuned_engine = engine(tuned.path)
            elif tuned.quantize != "none":
                self.tuned_engine = engine(model, tuned.quantize)
            if tuned.kind != "full":
                self.tuned_engine.register_adapter("tuned", str(tuned.path))
                self.apply = {"adapter" if tuned.kind == "lora" else "soft_prompt": "tuned"}

    def generate(self, rows: list[Example], tuned: bool, shots: list[list[Example]] | None = None) -> list[str]:
        from loraplex.server.engine.sampler import SamplingParams
        from loraplex.server.engine.sequence import Request

        engine = self.tuned_engine if tuned else self.base
        apply = self.apply if tuned else {}
        requests = [Request(**self.fmt.request(ex, shots=shots[i] if shots else ()), **apply,
                            params=SamplingParams(max_new_tokens=self.max_new_tokens), request_id=f"row-{i}")
                    for i, ex in enumerate(rows)]
        out = []
        for i, c in enumerate(engine.generate(requests)):
            if c.error:
                raise ValueError(f"row {i + 1}: {c.error}")
            out.append(c.text.strip())
        return out


def pick_shots(rows: list[Example], pool: list[Example], k: int, same_pool: bool) -> list[list[Example]]:
    """K solved examples per row: the first K of `pool`, skipping the row itself when the pool is
    the scored file (an example never answers itself)."""
    if k > len(pool) - (1 if same_pool else 0):
        raise ValueError(f"--base-shots {k}: only {len(pool)} rows to draw solved examples from")
    return [[s for s in pool if s is not ex][:k] if same_pool else pool[:k] for ex in rows]


def score_task(scorer: Scorer, rows: list[Example], shots: list[list[Example]] | None, has_tuned: bool) -> dict:
    refs = [ex.answer for ex in rows]
    sides: dict[str, list[str]] = {"base": scorer.generate(rows, tuned=False)}
    if shots:
        sides[f"base_{len(shots[0])}shot"] = scorer.generate(rows, tuned=False, shots=shots)
    if has_tuned:
        sides["tuned"] = scorer.generate(rows, tuned=True)
    scores = {name: score(preds, refs) for name, preds in sides.items()}
    samples = [{"reference": refs[i], **{name: preds[i] for name, preds in sides.items()}}
               for i in range(min(3, len(rows)))]
    result = {"n": len(rows), "scores": scores, "samples": samples}
    if scores["base"]["rougeL"] < MEASURABLE_ROUGE_L:
        result["note"] = (f"the base scores {scores['base']['rougeL']:.1f} ROUGE-L here: too low for a drop to be "
                          "measurable (see retention, which needs no labels)")
    return result


def evaluate(model: str | None, adapter: Path | None, data: Path, general: Path | None = None,
             fmt: PromptFormat | None = None, base_shots: int = 0, shots_data: Path | None = None,
             max_new_tokens: int = 64, limit: int | None = None, threads: int | None = None,
             retention_prompts: Path | None = None) -> dict:
    """The report (see module docstring). Raises DataError / TemplateError / ValueError."""
    rows = load_jsonl(data)[:limit]
    general_rows = load_jsonl(general)[:limit] if general else None
    shots = None
    if base_shots > 0:
        pool = load_jsonl(shots_data) if shots_data else load_jsonl(data)
        shots = pick_shots(rows, pool, base_shots, same_pool=shots_data is None)
    tuned = tuned_side(adapter) if adapter else None
    scorer = Scorer(model, tuned, fmt or format_for(None, adapter, None, model), max_new_tokens, threads)
    report = {"model": str(scorer.base.model_path), "tuned": str(adapter) if adapter else None,
              "tuned_kind": tuned.kind if tuned else None, "tuned_quantize": tuned.quantize if tuned else None,
              "template": scorer.fmt.template.name, "chat": scorer.fmt.chat, "max_new_tokens": max_new_tokens,
              "tasks": {"task": {"file": str(data), **score_task(scorer, rows, shots, tuned is not None)}}}
    if general_rows:
        report["tasks"]["general"] = {"file": str(general), **score_task(scorer, general_rows, None, tuned is not None)}
    if retention_prompts is not None and tuned is not None:
        from loraplex.server.engine.loader import cache_root

        prompts = load_prompts(retention_prompts)[:limit]
        report["retention"] = {"file": str(retention_prompts), **retention(
            scorer.base, scorer.tuned_engine, scorer.apply, prompts, max_new_tokens, cache_root() / "retention")}
    return report


def format_for(template: str | None, adapter: Path | None, chat: bool | None, model: str | None) -> PromptFormat:
    """The prompt format: flags first, then what the adapter was trained with, then defaults."""
    info = run_info(adapter)
    if template:
        tmpl = load_template(template)
    elif info.get("phrasings"):
        tmpl = parse_template("\n%%\n".join(info["phrasings"]), info.get("template", "trained"))
    else:
        tmpl = load_template("plain")
    if chat is None:
        chat = info.get("chat")
    if chat is None:
        from loraplex.server.engine.loader import load_tokenizer, resolve_model

        chat = default_chat(load_tokenizer(resolve_model(model)))
    return PromptFormat(tmpl, bool(chat))


def markdown(report: dict) -> str:
    lines = [f"model: `{report['model']}`; tuned: `{report['tuned']}` ({report['tuned_kind']}); "
             f"template {report['template']}, {'chat' if report['chat'] else 'plain'} prompts, greedy", ""]
    for task, result in report["tasks"].items():
        lines += [f"**{task}** (`{result['file']}`, {result['n']} rows)", "",
                  "| side | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
        for side, s in result["scores"].items():
            lines.append(f"| {side} | " + " | ".join(f"{s[m]:.1f}" for m in METRICS) + " |")
        lines += [f"_{result['note']}_", ""] if result.get("note") else [""]
    r = report.get("retention")
    if r:
        lines += [f"**retention against the base** (`{r['file']}`, {r['prompts']} prompts, {r['answer_tokens']} "
                  "answer tokens)", "", "| KL(base ‖ tuned) | retention | ROUGE-L vs base |", "|---|---|---|",
                  f"| {r['kl_base_tuned']:.4f} | {r['retention']:.3f} | {r['rouge_l_vs_base']:.1f} |", ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / REPORT_MD).write_text(markdown(report) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("base_shots", "max_new_tokens", "limit"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "base_shots" else 1):
            print(f"loraplex eval: error: --{flag.replace('_', '-')} must be positive, got {value}", file=sys.stderr)
            return 2
    adapter = Path(args.adapter) if args.adapter else None
    if args.retention and adapter is None:
        print("loraplex eval: error: --retention compares a tuned side with its base: give --adapter", file=sys.stderr)
        return 2
    try:
        if adapter is not None and not adapter.is_dir():
            raise ValueError(f"--adapter {args.adapter!r} is not a directory")
        fmt = format_for(args.template, adapter, args.chat, args.model)
        report = evaluate(args.model, adapter, Path(args.data), Path(args.general_data) if args.general_data else None,
                          fmt, args.base_shots, Path(args.shots_data) if args.shots_data else None,
                          args.max_new_tokens, args.limit, args.threads,
                          Path(args.retention) if args.retention else None)
    except (DataError, TemplateError, ValueError, FileNotFoundError) as exc:
        print(f"loraplex eval: error: {exc}", file=sys.stderr)
        return 2
    write_report(report, Path(args.out) if args.out else adapter or Path("."))
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else markdown(report))
    return 0
