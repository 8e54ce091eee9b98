#!/usr/bin/env bash
# The worked example, exactly as measured for docs/TRAINING.md (2-core CPU, default SmolLM2-135M-Instruct).
#   examples/orders/run.sh [WORK_DIR]     (default /tmp/orders; each step is skipped when its output exists)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/orders}"
mkdir -p "$work" && cd "$work"
lp="${LORAPLEX:-$here/../../.venv/bin/loraplex}"
py="${PYTHON:-$here/../../.venv/bin/python}"
"$py" "$here/make_data.py" data

# The same data, steps, batch and sequence length for every method: 40 steps x 4 rows, plain-text
# prompts (no chat wrapper: about 45 tokens a row instead of 86, which halves the CPU time).
common=(--data data/train.jsonl --eval-data data/val.jsonl --max-steps 40 --batch-size 4 --max-length 96
        --plain --save-steps 20 --logging-steps 5 --threads 2 --seed 0 --no-eval)
all_linear=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
train() { local out=$1; shift; [[ -f $out/training_args.json ]] || "$lp" train "$@" "${common[@]}" --out "$out"; }
score() { local out=$1; shift; [[ -f $out/eval.json ]] || "$lp" eval --adapter "$out" --data data/test.jsonl \
  --general-data data/general.jsonl --limit 30 --max-new-tokens 32 --threads 2 "$@" > "$out.eval.txt"; }

train runs/lora --method lora --rank 16 --alpha 32 --target-modules $all_linear --lr 3e-3
score runs/lora --base-shots 3 --shots-data data/train.jsonl
train runs/soft --method prompt-tuning --virtual-tokens 16 --init-text "Extract the order as a record:" --lr 3e-2
score runs/soft
train runs/full --method full --lr 5e-5
score runs/full
train runs/qlora --method qlora --rank 16 --alpha 32 --target-modules $all_linear --lr 3e-3
score runs/qlora
"$py" "$here/table.py" runs/lora runs/qlora runs/soft runs/full
