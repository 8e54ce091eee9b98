"""Print the method comparison table (markdown) from training runs' training_args.json and eval.json.

    python examples/orders/table.py runs/lora runs/qlora runs/soft runs/full
    python examples/orders/table.py --retention runs/lora ...   (eval.json from RUN-ret/, retention.sh's)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    args = json.loads((run / "training_args.json").read_text())
    report = json.loads((run / "eval.json").read_text())
    task, general = report["tasks"]["task"]["scores"], report["tasks"]["general"]["scores"]
    return (f"| {args['method']} | {task['tuned']['rougeL']:.1f} / {task['tuned']['exact_match']:.1f} "
            f"| {general['base']['rougeL']:.1f} → {general['tuned']['rougeL']:.1f} "
            f"| {general['base']['exact_match']:.1f} → {general['tuned']['exact_match']:.1f} "
            f"| {100 * args['trainable_share']:.3f}% ({args['trainable_params']:,}) "
            f"| {args['peak_memory_bytes'] / 2**30:.2f} GiB | {args['wall_seconds'] / 60:.1f} min "
            f"| {args['weights_bytes'] / 2**20:.2f} MiB | {args['global_step']} / {args['train_tokens']:,} |")


def retention_row(run: Path) -> str:
    args = json.loads((run / "training_args.json").read_text())
    report = json.loads((run.parent / f"{run.name}-ret" / "eval.json").read_text())
    task, r = report["tasks"]["task"]["scores"], report["retention"]
    return (f"| {run.name} | {task['tuned']['rougeL']:.1f} / {task['tuned']['exact_match']:.1f} "
            f"| {r['kl_base_tuned']:.3f} | {r['retention']:.3f} | {r['rouge_l_vs_base']:.1f} "
            f"| {100 * args['trainable_share']:.3f}% | {args['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"| {args['wall_seconds'] / 60:.1f} min | {args['weights_bytes'] / 2**20:.2f} MiB |")


def retention_table(runs: list[str]) -> None:
    print("| run | task ROUGE-L / EM | KL(base ‖ tuned) | retention | ROUGE-L vs base | trainable | peak RSS "
          "| wall | on disk |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(retention_row(Path(run)))


def main(runs: list[str]) -> None:
    if runs and runs[0] == "--retention":
        return retention_table(runs[1:])
    print("| method | task ROUGE-L / EM | general ROUGE-L before → after | general EM before → after "
          "| trainable | peak RSS | wall | on disk | steps / tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        path = Path(run)
        if (path / "eval.json").is_file():
            print(row(path))
        else:
            print(f"| {path.name} | not run | | | | | | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
