#!/usr/bin/env bash
# The README's first command, as a newcomer runs it: a clone of HEAD in a temporary directory (so
# no .venv to reuse), an empty LORAPLEX_CACHE (the default model is converted from scratch) and an
# empty store; pip's wheel cache may stay. Waits until the server answers, sends one
# `loraplex complete`, checks it against `loraplex generate` (the same greedy tokens), stops the
# server with SIGTERM, and checks that commands needing another extra say which. Prints how long
# the install and the first start took.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
readme_serve=$(grep -m1 '^scripts/install.sh serve && ' "$repo/README.md")
[[ $readme_serve == "scripts/install.sh serve && .venv/bin/loraplex serve" ]] || {
  echo "fresh_serve: the README's first command changed ($readme_serve); update .ci/fresh_serve.sh" >&2
  exit 1
}

work=$(mktemp -d)
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
# The `loraplex serve` process (python running .venv/bin/loraplex): the wrapper shell itself
# when it exec'd it, else its child.
serve_process() {
  local pattern='^[^ ]*python[0-9.]* [^ ]*bin/loraplex serve'
  if tr '\0' ' ' <"/proc/$server_pid/cmdline" 2>/dev/null | grep -Eq "$pattern"; then
    echo "$server_pid"
  else
    pgrep -P "$server_pid" -f "$pattern" || true
  fi
}
git clone --quiet "$repo" "$work/loraplex"
cd "$work/loraplex"
export LORAPLEX_CACHE="$work/cache" LORAPLEX_STORE="$work/store"
prompt="Once upon a time, by the sea,"

start=$(date +%s)
bash -c "$readme_serve" >"$work/serve.log" 2>&1 &
server_pid=$!
installed=""
for _ in $(seq 1 1200); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    cat "$work/serve.log" >&2
    echo "fresh_serve: the README's first command exited before serving" >&2
    exit 1
  fi
  if [[ -z $installed && -n $(serve_process) ]]; then
    installed=$(date +%s)
  fi
  if [[ -n $installed ]] && .venv/bin/python - <<'PY' 2>/dev/null
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel("127.0.0.1:50051") as channel:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
raise SystemExit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
  then
    break
  fi
  sleep 1
done
serving=$(date +%s)
[[ -n $installed ]] || { echo "fresh_serve: no server after 20 minutes" >&2; exit 1; }

.venv/bin/loraplex complete --server 127.0.0.1:50051 --max-new-tokens 16 --temperature 0 --ignore-eos --json "$prompt" \
  >"$work/complete.json"
printf '{"prompt": %s, "max_new_tokens": 16, "temperature": 0, "ignore_eos": true}\n' \
  "$(.venv/bin/python -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$prompt")" >"$work/requests.jsonl"
.venv/bin/loraplex generate --input "$work/requests.jsonl" --json >"$work/generate.json"
.venv/bin/python - "$work/complete.json" "$work/generate.json" <<'PY'
import json, sys
served = json.load(open(sys.argv[1]))
offline = json.loads(open(sys.argv[2]).read().splitlines()[0])
assert served["text"].strip(), f"empty completion: {served}"
assert served["token_ids"] == offline["token_ids"], f"served {served['token_ids']} != generate {offline['token_ids']}"
print(f"fresh_serve: complete answered {served['text']!r} ({len(served['token_ids'])} tokens, same as generate)")
PY

kill -TERM "$(serve_process)"
status=0
wait "$server_pid" || status=$?
server_pid=""
[[ $status == 0 ]] || { tail -20 "$work/serve.log" >&2; echo "fresh_serve: serve exited $status on SIGTERM" >&2; exit 1; }

# Commands of other extras, on this serve-only install: one line naming the install command, exit 2.
for command in "train --method lora --data x.jsonl --out out" "bench --quick"; do
  extra=${command%% *}
  status=0
  .venv/bin/loraplex $command >"$work/extra.out" 2>&1 || status=$?
  if [[ $status != 2 ]] || ! grep -q "scripts/install.sh $extra" "$work/extra.out" || grep -q Traceback "$work/extra.out"; then
    cat "$work/extra.out" >&2
    echo "fresh_serve: 'loraplex $command' on a serve install exited $status without naming scripts/install.sh $extra" >&2
    exit 1
  fi
done

echo "fresh_serve: install $((installed - start)) s, first start (model conversion included) $((serving - installed)) s"
