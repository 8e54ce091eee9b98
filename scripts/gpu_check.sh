#!/usr/bin/env bash
# Everything GPU-side in one call (scripts/gpu_check.py says what and how):
#   scripts/gpu_check.sh --prepare    here, before: writes .gpu_check/ to carry
#   scripts/gpu_check.sh              on the GPU machine: device tool, carry [".gpu_check"]
#   scripts/gpu_check.sh --dry-run    on a CPU (the suite runs it, so it cannot rot)
# Never installs anything: the GPU machine's own python3 runs it (PYTHON overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
