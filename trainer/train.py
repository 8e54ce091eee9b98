"""`loraplex train`: LoRA, QLoRA, prompt tuning or full fine-tuning on Hugging Face `Trainer`.

    loraplex train --model PATH --method lora --data task.jsonl[:WEIGHT] ... --out DIR

The output directory holds what `peft.PeftModel.from_pretrained` loads (a full model directory
for `--method full`), plus `training_args.json` (arguments, parameter counts, wall time, peak
memory, size on disk), `loraplex_template.txt` (the served prompt template, when the task has
one instruction), `train_log.jsonl` (loss and learning rate), `test.jsonl` (the held-out rows,
without --eval-data) and the evaluation report (`eval.json`, `eval.md`). Checkpoints are written
to DIR/checkpoints every --save-steps and removed after a successful run (--keep-checkpoints
keeps them); --resume continues from the last one.

Several GPUs: run the same command under `accelerate launch -m loraplex.trainer.train ...`
(Trainer is accelerate-aware; `accelerate config` once per machine).

Exit status: 0 done, 1 training or registration failed, 2 unusable arguments or data.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .data import DataError, Example, load_jsonl, mix, parse_data_arg, split, write_jsonl
from .methods import METHODS, PROMPT_INITS, MethodOptions
from .prompts import PromptFormat, default_chat
from .templates import TemplateError, load_template, served_template

DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "prompt-tuning": 3e-2, "full": 2e-5}
TEMPLATE_FILE = "loraplex_template.txt"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"


class UsageError(ValueError):
    """Arguments that parsed but do not go together."""


def _positive(kind):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return convert


def _data_arg(text: str) -> tuple[str, float]:
    try:
        return parse_data_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: Hugging Face directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--data", required=True, action="append", type=_data_arg, metavar="FILE[:WEIGHT]",
                   help="training rows (JSONL); repeat for multi-task training, mixed by WEIGHT (default 1)")
    p.add_argument("--eval-data", metavar="FILE", help="validation and test rows (default: a seeded split of "
                                                       "each --data file, 80/10/10)")
    p.add_argument("--template", default="flan", metavar="NAME|FILE",
                   help="instruction template: a built-in (flan, plain) or a file of phrasings")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="chat", action="store_true", default=None,
                     help="prompts as chat user turns (default when the tokenizer has a chat template)")
    fmt.add_argument("--plain", dest="chat", action="store_false", help="prompts as plain text")
    lora = p.add_argument_group("LoRA and QLoRA")
    lora.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj", metavar="M,M,...")
    lora.add_argument("--rank", type=_positive(int), default=8)
    lora.add_argument("--alpha", type=_positive(float), default=16.0)
    lora.add_argument("--dropout", type=float, default=0.0)
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) (rank-stabilised LoRA)")
    pt = p.add_argument_group("prompt tuning")
    pt.add_argument("--virtual-tokens", type=_positive(int), default=16)
    pt.add_argument("--prompt-init", choices=PROMPT_INITS, help="random (default), sample-vocab, or text")
    pt.add_argument("--init-text", metavar="TEXT", help="initialise from this text's embeddings (implies --prompt-init text)")
    t = p.add_argument_group("training")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive(float), help="passes over the mixed training rows (default 1)")
    length.add_argument("--max-steps", type=_positive(int), help="optimizer steps (instead of --epochs)")
    t.add_argument("--lr", type=_positive(float), help=f"learning rate (default per method: {DEFAULT_LR})")
    t.add_argument("--batch-size", type=_positive(int), default=8)
    t.add_argument("--grad-accum", type=_positive(int), default=1)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--max-length", type=_positive(int), default=256, help="tokens per example (prompt + answer)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-steps", type=_positive(int), default=100, help="checkpoint every N steps")
    t.add_argument("--logging-steps", type=_positive(int), default=10)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in DIR/checkpoints")
    t.add_argument("--keep-checkpoints", action="store_true")
    t.add_argument("--threads", type=int, help="CPU threads for torch")
    e = p.add_argument_group("evaluation")
    e.add_argument("--no-eval", action="store_true", help="skip scoring the held-out rows after training")
    e.add_argument("--eval-limit", type=_positive(int), help="score at most N held-out rows")
    e.add_argument("--max-new-tokens", type=_positive(int), default=64)
    p.add_argument("--out", required=True, metavar="DIR")
    r = p.add_argument_group("registering on a server")
    r.add_argument("--register", metavar="HOST:PORT", help="upload the adapter and point --endpoint at it")
    r.add_argument("--endpoint", metavar="NAME")
    r.add_argument("--adapter-name", metavar="NAME", help="the adapter's registry name (default: the endpoint's)")
    r.add_argument("--admin-token-file", metavar="FILE")
    r.add_argument("--tls-ca", metavar="FILE")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations that would be silently ignored."""
    lora_flags = [f for f, default in (("--rank", 8), ("--alpha", 16.0), ("--dropout", 0.0), ("--rslora", False),
                                        ("--target-modules", "q_proj,k_proj,v_proj,o_proj"))
                  if getattr(args, f[2:].replace("-", "_")) != default]
    pt_flags = [f for f, v in (("--virtual-tokens", args.virtual_tokens != 16), ("--prompt-init", args.prompt_init),
                               ("--init-text", args.init_text)) if v]
    if args.method not in ("lora", "qlora") and lora_flags:
        raise UsageError(f"{', '.join(lora_flags)} apply to --method lora/qlora, not {args.method}")
    if args.method != "prompt-tuning" and pt_flags:
        raise UsageError(f"{', '.join(pt_flags)} apply to --method prompt-tuning, not {args.method}")
    if args.init_text is not None:
        if args.prompt_init not in (None, "text"):
            raise UsageError("--init-text goes with --prompt-init text")
        if not args.init_text.strip():
            raise UsageError("--init-text is empty")
        args.prompt_init = "text"
    if args.prompt_init == "text" and args.init_text is None:
        raise UsageError("--prompt-init text needs --init-text")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if not targets:
        raise UsageError("--target-modules is empty")
    args.target_modules = tuple(targets)
    if args.register and not args.endpoint:
        raise UsageError("--register needs --endpoint NAME")
    if args.endpoint and not args.register:
        raise UsageError("--endpoint goes with --register HOST:PORT")
    if args.register and args.method == "full":
        raise UsageError("--method full writes a whole model, which is served as a base (--model), not registered")


class TrainingSet:
    """The tokenized rows (a torch map-style dataset) and how many were dropped as too long."""

    def __init__(self, fmt: PromptFormat, tokenizer, rows: list[Example], seed: int, max_length: int,
                 vary_phrasing: bool) -> None:
        self.items = []
        self.dropped = 0
        for i, ex in enumerate(rows):
            phrasing = fmt.template.pick(seed, i) if vary_phrasing else None
            item = fmt.encode(tokenizer, ex, phrasing, max_length)
            if item is None:
                self.dropped += 1
            else:
                self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class Collator:
    """Pads a batch to its longest row (labels padded with -100) and counts the real tokens."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        self.tokens += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_tasks(args: argparse.Namespace) -> tuple[list[tuple[list[Example], float]], list[Example], list[Example]]:
    """(training tasks with weights, validation rows, test rows of the first task)."""
    tasks, val, test = [], [], []
    if args.eval_data:
        held_out = load_jsonl(args.eval_data)
        tasks = [(load_jsonl(path), w) for path, w in args.data]
        return tasks, held_out, held_out
    for i, (path, w) in enumerate(args.data):
        train_rows, val_rows, test_rows = split(load_jsonl(path), args.seed)
        if not train_rows:
            raise DataError(f"{path}: too few rows to split into train/validation/test")
        tasks.append((train_rows, w))
        val += val_rows
        if i == 0:
            test = test_rows
    return tasks, val, test


def served_prompt_template(fmt: PromptFormat, rows: list[Example]) -> str | None:
    """The endpoint template for the first task: only when all its rows share one instruction."""
    instructions = {ex.instruction for ex in rows}
    if len(instructions) != 1 or None in instructions:
        return None
    return served_template(fmt.template.served, instructions.pop())


def peak_memory_bytes() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def weights_size(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def make_trainer(args, model, train_set, val_set, collator, ckpt_dir: Path, log_path: Path):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class JsonlLog(TrainerCallback):
        """Every logged step (loss, learning rate, grad norm, eval loss) as one JSON line."""

        def on_log(self, targs, state, control, logs=None, **kwargs):
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **(logs or {})}) + "\n")

    targs = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, num_train_epochs=args.epochs or 1.0, max_steps=args.max_steps or -1,
        warmup_steps=args.warmup_steps, logging_steps=args.logging_steps, logging_first_step=True,
        save_steps=args.save_steps, save_total_limit=2, eval_strategy="steps" if len(val_set) else "no",
        eval_steps=args.save_steps, seed=args.seed, data_seed=args.seed, report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        optim="adamw_torch",
    )
    return Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=val_set if len(val_set) else None,
                   data_collator=collator, callbacks=[JsonlLog()])


def train(args: argparse.Namespace) -> dict:
    """Train and save; returns the run record written to training_args.json."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from loraplex.server.engine.loader import load_tokenizer, resolve_model

    from .methods import parameter_counts, prepare

    out = Path(args.out)
    ckpt_dir = out / CHECKPOINTS
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if args.resume and last is None:
        raise UsageError(f"--resume: no checkpoint in {ckpt_dir}")
    if not args.resume and last is not None:
        raise UsageError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or choose another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    chat = default_chat(tokenizer) if args.chat is None else args.chat
    fmt = PromptFormat(load_template(args.template), chat)
    tasks, val_rows, test_rows = load_tasks(args)
    if any(ex.messages is not None for rows, _ in tasks for ex in rows) and not chat:
        raise UsageError("the data has chat rows ('messages'), which need --chat and a tokenizer with a chat template")
    mixed = mix(tasks, args.seed)
    train_set = TrainingSet(fmt, tokenizer, mixed, args.seed, args.max_length, vary_phrasing=True)
    val_set = TrainingSet(fmt, tokenizer, val_rows, args.seed, args.max_length, vary_phrasing=False)
    if not len(train_set):
        raise DataError(f"no training row fits in --max-length {args.max_length} tokens")
    if train_set.dropped:
        print(f"loraplex train: {train_set.dropped} row(s) longer than --max-length {args.max_length} dropped",
              file=sys.stderr)
    args.lr = args.lr or DEFAULT_LR[args.method]
    opts = MethodOptions(rank=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora,
                         target_modules=args.target_modules, virtual_tokens=args.virtual_tokens,
                         prompt_init=args.prompt_init or "random", init_text=args.init_text)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = prepare(args.method, model_dir, opts)
    trainable, total = parameter_counts(model)
    collator = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    trainer = make_trainer(args, model, train_set, val_set, collator, ckpt_dir, out / LOG_FILE)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last if args.resume else None)
    wall = time.perf_counter() - started
    peak = peak_memory_bytes()

    trainer.model.save_pretrained(out)
    if args.method == "full":
        tokenizer.save_pretrained(out)
    template = served_prompt_template(fmt, tasks[0][0]) if args.method != "full" else None
    if template is not None:
        (out / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    if not args.eval_data and test_rows:
        write_jsonl(out / "test.jsonl", test_rows)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record = {
        "method": args.method, "model": str(model_dir), "data": [[p, w] for p, w in args.data],
        "eval_data": args.eval_data, "template": fmt.template.name, "phrasings": list(fmt.template.phrasings),
        "chat": chat, "served_template": template,
        "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "rslora": args.rslora,
                 "target_modules": list(args.target_modules)} if args.method in ("lora", "qlora") else None,
        "prompt_tuning": {"virtual_tokens": args.virtual_tokens, "init": opts.prompt_init, "init_text": args.init_text}
        if args.method == "prompt-tuning" else None,
        "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "warmup_steps": args.warmup_steps, "max_length": args.max_length,
        "seed": args.seed, "global_step": trainer.state.global_step, "train_rows": len(train_set),
        "dropped_rows": train_set.dropped, "train_tokens": collator.tokens, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "train_loss": result.training_loss,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "wall_seconds": round(wall, 2), "peak_memory_bytes": peak, "weights_bytes": weights_size(out),
        "resumed_from": last if args.resume else None,
    }
    (out / "training_args.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return record


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        record = train(args)
    except (UsageError, DataError, TemplateError, FileNotFoundError) as exc:
        print(f"loraplex train: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"loraplex train: {record['global_step']} steps in {record['wall_seconds']} s, loss "
          f"{record['first_loss']} -> {record['final_loss']}; {record['trainable_params']:,} trainable parameters "
          f"({100 * record['trainable_share']:.3f}%); wrote {out}", file=sys.stderr)
    data = Path(args.eval_data) if args.eval_data else out / "test.jsonl"
    if not args.no_eval and data.is_file():
        from .evaluate import evaluate, format_for, markdown, write_report

        try:
            report = evaluate(args.model, out, data, fmt=format_for(None, out, None, args.model),
                              max_new_tokens=args.max_new_tokens, limit=args.eval_limit, threads=args.threads)
        except (DataError, ValueError) as exc:
            print(f"loraplex train: evaluation failed: {exc}", file=sys.stderr)
            return 1
        write_report(report, out)
        print(markdown(report), file=sys.stderr)
    if args.register:
        return register_run(args, record)
    return 0


def register_run(args: argparse.Namespace, record: dict) -> int:
    from loraplex.clients.client import LoraplexError

    from .register import read_secret, register

    kind = "soft_prompt" if record["method"] == "prompt-tuning" else "lora"
    try:
        result = register(args.register, Path(args.out), args.adapter_name or args.endpoint, args.endpoint, kind,
                          admin_token=read_secret(args.admin_token_file), tls_ca=args.tls_ca)
    except ValueError as exc:
        print(f"loraplex train: error: {exc}", file=sys.stderr)
        return 2
    except LoraplexError as exc:
        print(f"loraplex train: registering failed: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    info = result["adapter"]
    print(f"loraplex train: registered {info['name']}@{info['version']}; endpoint {args.endpoint} now serves it",
          file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
