#!/usr/bin/env bash
# The retention table of docs/TRAINING.md: every method on the orders task, then `loraplex eval
# --retention` (40 of the shipped general prompts, chat format, 32 new tokens) beside the task score.
#   examples/orders/retention.sh [WORK_DIR]     (default /tmp/orders; a step is skipped when its output exists)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/orders}"
mkdir -p "$work" && cd "$work"
lp="${LORAPLEX:-$here/../../.venv/bin/loraplex}"
py="${PYTHON:-$here/../../.venv/bin/python}"
"$py" "$here/make_data.py" data

common=(--eval-data data/val.jsonl --max-steps 40 --batch-size 4 --max-length 96 --plain --save-steps 20
        --logging-steps 5 --threads 2 --seed 0 --no-eval)
all_linear=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
train() { local out=$1; shift; [[ -f $out/training_args.json ]] || "$lp" train "$@" "${common[@]}" --out "$out"; }
score() { [[ -f $1-ret/eval.json ]] || "$lp" eval --adapter "$1" --data data/test.jsonl --limit 40 --max-new-tokens 32 \
  --threads 2 --retention --out "$1-ret" --json > "$1-ret.txt"; }

train runs/lora --method lora --rank 16 --alpha 32 --target-modules $all_linear --lr 3e-3 --data data/train.jsonl
score runs/lora
train runs/lora-mix --method lora --rank 16 --alpha 32 --target-modules $all_linear --lr 3e-3 \
  --data data/train.jsonl --data data/general.jsonl:0.2
score runs/lora-mix
train runs/soft --method prompt-tuning --virtual-tokens 16 --init-text "Extract the order as a record:" --lr 3e-2 \
  --data data/train.jsonl
score runs/soft
train runs/qlora --method qlora --rank 16 --alpha 32 --target-modules $all_linear --lr 3e-3 --data data/train.jsonl
score runs/qlora
train runs/full --method full --lr 5e-5 --data data/train.jsonl
score runs/full
"$py" "$here/table.py" --retention runs/lora runs/lora-mix runs/qlora runs/soft runs/full
