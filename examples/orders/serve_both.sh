#!/usr/bin/env bash
# Serve the worked example's LoRA and soft prompt side by side from one `loraplex serve` and call
# both endpoints at once with the same unseen order sentence.
#   examples/orders/serve_both.sh [WORK_DIR]   (after run.sh; default /tmp/orders)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/orders}"
cd "$work"
lp="${LORAPLEX:-$here/../../.venv/bin/loraplex}"
port=50071
rm -rf store && : > serve.log
"$lp" serve --store store --port "$port" --metrics-port 0 --threads 2 > serve.log 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
until grep -q "loraplex serving" serve.log; do
  kill -0 $server 2>/dev/null || { cat serve.log; exit 1; }
  sleep 0.5
done
s=(--server "127.0.0.1:$port")
"$lp" adapters register orders-lora runs/lora "${s[@]}" > /dev/null
"$lp" adapters register orders-soft runs/soft "${s[@]}" > /dev/null
template="$(cat runs/lora/loraplex_template.txt)"
"$lp" endpoints create orders --adapter orders-lora --template "$template" --stop $'\n' --max-new-tokens 32 "${s[@]}" > /dev/null
"$lp" endpoints create orders-soft --soft-prompt orders-soft --template "$template" --stop $'\n' --max-new-tokens 32 "${s[@]}" > /dev/null
sentence="Ship to Porto: three red lamps, due Monday."
clients=()
for endpoint in orders orders-soft; do  # both at once: they share the engine's batches
  "$lp" complete --endpoint "$endpoint" "${s[@]}" "$sentence" > "$endpoint.out" &
  clients+=($!)
done
wait "${clients[@]}"
for endpoint in orders orders-soft; do
  printf '%-12s %s\n' "$endpoint" "$(cat "$endpoint.out")"
done
